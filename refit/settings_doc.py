"""The configuration reference: every setting refit reads, per component, and the generator of
docs/configuration.md from it (``python -m refit.settings_doc`` writes the file).

Settings read by refit's Python are declared where they are read (refit.settings); they are
only listed here. Declared here are the variables nothing in refit's Python can declare: those
read by compose, the Dockerfile and scripts, and by programs that must run without refit's code
(TorchServe's handler and key keeper, the containers' init job)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from cli.client import ClientSettings
from local_stack.settings import TORCHSERVE_HTTP_PORTS, StackSettings
from refit import shared_settings as shared
from refit.logs import LOG_FORMAT, LOG_LEVEL
from refit.settings import SETTING, Setting, declare, declared
from refit.storage import StorageSettings
from refit.tokens import ADMIN_TOKEN, CLIENT_TOKEN, PREDICT_TOKEN, TOKENS_FILE
from service.auth import INSECURE_NO_AUTH
from service.config import ServiceSettings, TlsSettings
from trainer.jobs.settings import TrainerSettings
from trainer.jobs.torchrun import TRAINER_PID
from trainer.metrics import MULTIPROC_DIR

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
COMMAND = "python -m refit.settings_doc"

# trainer/serving/onnx_handler.py runs in TorchServe's workers, from an archive: it may not
# import refit, so it reads this itself.
ORT_THREADS = declare(
    "REFIT_ORT_THREADS",
    None,
    "ONNX Runtime threads per TorchServe worker of an ONNX model",
    parse=int,
    shown="usable cores / the model's workers",
)
# deploy/torchserve/keeper.py runs in the TorchServe image, which holds no refit code.
TORCHSERVE_REPLICA = declare(
    "REFIT_TORCHSERVE_REPLICA",
    "",
    "the name the keeper publishes this replica's keys under; empty: this host's address",
    shown="this host's address",
)
CONTAINERS = (
    declare("REFIT_IMAGE_TAG", "local", "tag of the images compose builds and runs"),
    declare("REFIT_BASE_IMAGE", "python:3.11-slim-bookworm", "base image of refit's images"),
    declare("REFIT_PIP_INDEX_URL", "https://pypi.org/simple", "package index the builds use"),
    declare("REFIT_PIP_EXTRA_INDEX_URL", "", "more package indexes, space-separated"),
    declare("REFIT_PIP_TRUSTED_HOST", "", "index hosts pip trusts without TLS"),
    declare(
        "REFIT_GRPC_PORT",
        "50051",
        "host port (on 127.0.0.1) of the service's API; a range (50051-50052): one per replica",
    ),
    declare("REFIT_SERVICE_REPLICAS", 1, "service replicas on this host"),
    declare("REFIT_TORCHSERVE_REPLICAS", 1, "TorchServe replicas on this host"),
    declare("PROMETHEUS_PORT", 9090, "host port (on 127.0.0.1) of Prometheus"),
    declare("GRAFANA_PORT", 3000, "host port (on 127.0.0.1) of Grafana"),
    declare("GRAFANA_ADMIN_PASSWORD", "", "Grafana's admin password (required)", secret=True),
    declare(
        "REFIT_DOCKERD_PIDFILE",
        "/tmp/refit-dockerd.pid",
        "pid file of the Docker engine deploy/containers/engine.sh starts for the tests",
    ),
)
# deploy/containers/minio_init.py: the one-shot job that creates the buckets and identities.
MINIO_INIT = (
    declare("MINIO_ROOT_USER", "", "MinIO's root user; only minio-init gets it", secret=True),
    declare("MINIO_ROOT_PASSWORD", "", "MinIO's root password (8+ characters)", secret=True),
    *(
        declare(f"MINIO_{role.upper()}_SECRET_KEY", "", f"secret key of refit-{role}", secret=True)
        for role in ("service", "trainer", "torchserve")
    ),
)


@dataclass(frozen=True)
class Component:
    title: str
    about: str
    classes: tuple[type, ...] = ()  # their own fields; nested settings are components of theirs
    settings: tuple[Setting, ...] = ()

    def rows(self) -> list[Setting]:
        own = [
            f.metadata[SETTING] for c in self.classes for f in fields(c) if SETTING in f.metadata
        ]
        return own + list(self.settings)


COMPONENTS = (
    Component(
        "Service",
        "`python -m service.server` (`ServiceSettings`, service/config.py); it also reads the "
        "object store, API token and logging settings below.",
        (ServiceSettings, TlsSettings),
        (INSECURE_NO_AUTH,),
    ),
    Component(
        "Trainer",
        "`python -m trainer.server` (`TrainerSettings`, trainer/jobs/settings.py); it also reads "
        "the object store and logging settings below.",
        (TrainerSettings,),
        (MULTIPROC_DIR, TRAINER_PID),
    ),
    Component(
        "Object store",
        "`StorageSettings` (refit/storage/base.py), read by the service, the trainer, the CLI "
        "and the local stack. The key keeper (deploy/torchserve/keeper.py) reads MINIO_ENDPOINT, "
        "MINIO_ACCESS_KEY, MINIO_SECRET_KEY, MINIO_REGION and REFIT_BUCKET too.",
        (StorageSettings,),
        (shared.BUCKET,),
    ),
    Component(
        "API tokens",
        "refit/tokens.py: the service accepts these tokens; the CLI sends one.",
        settings=(ADMIN_TOKEN, PREDICT_TOKEN, TOKENS_FILE, CLIENT_TOKEN),
    ),
    Component(
        "Logging",
        "refit/logs.py, in every refit process.",
        settings=(LOG_FORMAT, LOG_LEVEL),
    ),
    Component(
        "TorchServe: handler and key keeper",
        "trainer/serving/onnx_handler.py runs in TorchServe's workers; deploy/torchserve/keeper.py "
        "runs TorchServe and publishes its keys. Neither may import refit: they read these "
        "themselves.",
        settings=(ORT_THREADS, TORCHSERVE_REPLICA),
    ),
    Component(
        "Local stack",
        "`make up` / `make down` / `make status` (`StackSettings`, local_stack/settings.py): where "
        "each component listens; it passes them on to the service and the trainer.",
        (StackSettings,),
        (TORCHSERVE_HTTP_PORTS, shared.TORCHSERVE_INFERENCE, shared.TORCHSERVE_MANAGEMENT),
    ),
    Component(
        "CLI",
        "`refit ...` (`ClientSettings`, cli/client.py); `refit gc` and `refit dataset` also read "
        "the object store settings, and REFIT_BUCKET.",
        (ClientSettings,),
    ),
    Component(
        "Containers",
        "Read by docker-compose.yml, the Dockerfile's builds and deploy/containers/ (the "
        "minio-init job: deploy/containers/minio_init.py). Compose's own COMPOSE_PROJECT_NAME "
        "and COMPOSE_PROFILES are in .env.example.",
        settings=CONTAINERS + MINIO_INIT,
    ),
)


def every_setting() -> dict[str, Setting]:
    """Every declared setting by name, nested classes' included; a name declared twice with
    different declarations is an error."""
    found: dict[str, Setting] = {}
    for setting in _walk():
        if found.setdefault(setting.name, setting) is not setting:
            raise ValueError(f"{setting.name} is declared twice")
    return found


def _walk() -> list[Setting]:
    out = [s for component in COMPONENTS for s in component.settings]
    return out + [s for component in COMPONENTS for c in component.classes for s in declared(c)]


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        f"Generated by `{COMMAND}` from the settings' declarations (refit/settings.py); do not "
        "edit by hand. Every setting is an environment variable. An unset or empty variable "
        "keeps the default (an empty string is a value for strings); a value that does not "
        "parse stops the process at start, naming the variable.",
        "",
    ]
    for component in COMPONENTS:
        lines += [f"## {component.title}", "", component.about, ""]
        lines += ["| Variable | Default | Type | What it does |", "|---|---|---|---|"]
        lines += [_row(s) for s in component.rows()]
        lines.append("")
    return "\n".join(lines)


def _row(setting: Setting) -> str:
    default = setting.shown_default
    if setting.shown is None:
        default = f"`{default}`" if default else "(empty)"
    cells = (f"`{setting.name}`", default, setting.type_name, setting.doc)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=f"write {DOC.name} from the declarations").parse_args(argv)
    every_setting()  # ValueError: a name declared twice
    DOC.write_text(render())
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

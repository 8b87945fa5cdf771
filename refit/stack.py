"""``make up`` / ``make down`` / ``make status``: the local stack, no Docker needed.

What runs where (all on loopback):
    object store   MinIO at $MINIO_ENDPOINT, else the embedded FileStore in $REFIT_DATA_DIR/objects
    TorchServe     REST 8080-8082, gRPC 7070/7071 (home: $REFIT_DATA_DIR/torchserve)
    refit service  gRPC 50051, metrics 9101
    trainer        gRPC 50052 (internal), metrics 9102
    Prometheus     9090, when installed
State lives in $REFIT_DATA_DIR (default ./.refit) and survives ``make down && make up``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from refit.netutil import wait_serving
from refit.storage import StorageSettings
from refit.tokens import create_tokens_file, tokens_file
from refit.torchserve_process import TorchServePorts, TorchServeProcess, allowed_urls_for

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.local.yml"


@dataclass(frozen=True)
class StackSettings:
    storage: StorageSettings
    bucket: str = "refit"
    grpc_address: str = "127.0.0.1:50051"
    metrics_address: str = "127.0.0.1:9101"
    prometheus_address: str = "127.0.0.1:9090"
    scrape_interval: str = "15s"
    trainer_address: str = "127.0.0.1:50052"
    trainer_metrics_address: str = "127.0.0.1:9102"
    torchserve: TorchServePorts = field(default_factory=TorchServePorts)

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir.resolve()

    @classmethod
    def from_env(cls) -> StackSettings:
        return cls(
            storage=StorageSettings.from_env(),
            bucket=os.environ.get("REFIT_BUCKET", "refit"),
            grpc_address=os.environ.get("REFIT_GRPC_ADDRESS", "127.0.0.1:50051"),
            metrics_address=os.environ.get("REFIT_METRICS_ADDRESS", "127.0.0.1:9101"),
            prometheus_address=os.environ.get("REFIT_PROMETHEUS_ADDRESS", "127.0.0.1:9090"),
            trainer_address=os.environ.get("REFIT_TRAINER_ADDRESS", "127.0.0.1:50052"),
            trainer_metrics_address=os.environ.get(
                "REFIT_TRAINER_METRICS_ADDRESS", "127.0.0.1:9102"
            ),
        )

    def storage_url(self) -> str:
        """The URL prefix of every archive TorchServe may fetch."""
        if self.storage.endpoint:
            return self.storage.endpoint
        return (self.data_dir / "objects").as_uri()

    def scrape_targets(self) -> dict[str, str]:
        return {
            "refit-service": self.metrics_address,
            "refit-trainer": self.trainer_metrics_address,
            "torchserve": f"127.0.0.1:{self.torchserve.metrics}",
        }

    def service_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REFIT_DATA_DIR": str(self.data_dir),
            "REFIT_BUCKET": self.bucket,
            "REFIT_GRPC_ADDRESS": self.grpc_address,
            "REFIT_METRICS_ADDRESS": self.metrics_address,
            "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{self.torchserve.grpc_inference}",
            "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{self.torchserve.grpc_management}",
            "REFIT_TRAINER_ADDRESS": self.trainer_address,
            "REFIT_TRAINER_GRPC_ADDRESS": self.trainer_address,
            "REFIT_TRAINER_METRICS_ADDRESS": self.trainer_metrics_address,
            "REFIT_TOKENS_FILE": str(tokens_file(self.data_dir)),  # API tokens (refit.tokens)
        }


@dataclass(frozen=True)
class Daemon:
    """A background process with a pid file and a log file under the data dir."""

    name: str
    argv: tuple[str, ...]
    data_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "run" / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        return pid

    def start(self, env: dict[str, str]) -> None:
        if self.pid() is not None:
            return
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as log:
            process = subprocess.Popen(
                self.argv,
                env=env,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the `make` that started it
            )
        self.pid_file.write_text(str(process.pid))

    def stop(self, timeout_s: float = 15.0) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.pid() is not None:
                os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)


class Stack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        data = settings.data_dir
        self.torchserve = TorchServeProcess(
            data / "torchserve", settings.torchserve, allowed_urls_for(settings.storage_url())
        )
        self.trainer = Daemon("trainer", (sys.executable, "-m", "trainer.server"), data)
        self.service = Daemon("service", (sys.executable, "-m", "service.server"), data)
        prometheus = shutil.which("prometheus")
        self.prometheus = (
            Daemon(
                "prometheus",
                (
                    prometheus,
                    f"--config.file={data / 'prometheus.yml'}",
                    f"--storage.tsdb.path={data / 'prometheus'}",
                    f"--web.listen-address={settings.prometheus_address}",
                ),
                data,
            )
            if prometheus
            else None
        )

    def up(self, timeout_s: float = 300.0) -> None:
        env = self.settings.service_env()
        _step("object store", self.settings.storage_url())
        self.torchserve.start()
        _step("TorchServe", f"127.0.0.1:{self.settings.torchserve.grpc_inference} (gRPC)")
        subprocess.run(
            [sys.executable, "-m", "trainer.base_model", "--bucket", self.settings.bucket],
            env=env,
            check=True,
        )
        self.trainer.start({**env, "PROMETHEUS_MULTIPROC_DIR": str(self._fresh_metrics_dir())})
        self._wait(self.settings.trainer_address, timeout_s, self.trainer)
        _step(
            "trainer",
            f"{self.settings.trainer_address} (metrics on "
            f"http://{self.settings.trainer_metrics_address}/metrics)",
        )
        if create_tokens_file(tokens_file(self.settings.data_dir)):
            _step("API tokens", f"{tokens_file(self.settings.data_dir)} (mode 0600)")
        self.service.start(env)
        if self.prometheus is not None:
            render_prometheus_config(self.settings, self.settings.data_dir / "prometheus.yml")
            self.prometheus.start(env)
            _step("Prometheus", f"http://{self.settings.prometheus_address}")
        else:
            _step("Prometheus", "not installed (apt-get install prometheus); skipped")
        self._wait(self.settings.grpc_address, timeout_s, self.service)
        _step(
            "refit service",
            f"{self.settings.grpc_address} (metrics on "
            f"http://{self.settings.metrics_address}/metrics)",
        )
        print(f"ready. logs: {self.settings.data_dir / 'logs'}; try: refit predict IMAGE")

    def _fresh_metrics_dir(self) -> Path:
        """The trainer's DataLoader workers report metrics through files here (multiprocess)."""
        path = self.settings.data_dir / "run" / "trainer-metrics"
        if self.trainer.pid() is None:  # never wipe the files of a running trainer
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _wait(address: str, timeout_s: float, daemon: Daemon) -> None:
        try:
            wait_serving(address, timeout_s, lambda: daemon.pid() is not None)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{daemon.name}: {exc}; see {daemon.log_file}") from exc

    def down(self) -> None:
        self.service.stop()
        self.trainer.stop()
        if self.prometheus is not None:
            self.prometheus.stop()
        self.torchserve.stop()
        print("stopped; state kept in", self.settings.data_dir)

    def status(self) -> int:
        rows = {
            "TorchServe": self.torchserve.is_healthy(),
            "refit service": self.service.pid() is not None,
            "trainer": self.trainer.pid() is not None,
        }
        if self.prometheus is not None:
            rows["Prometheus"] = self.prometheus.pid() is not None
        for name, running in rows.items():
            print(f"{name:15} {'running' if running else 'stopped'}")
        return 0 if all(rows.values()) else 1


def render_prometheus_config(settings: StackSettings, path: Path) -> None:
    """deploy/prometheus/prometheus.local.yml with this stack's ports and absolute rule paths."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = settings.scrape_interval
    config["global"]["evaluation_interval"] = settings.scrape_interval
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    targets = settings.scrape_targets()
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _step(name: str, where: str) -> None:
    print(f"  {name:15} {where}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    stack = Stack(StackSettings.from_env())
    if args.action == "up":
        stack.up()
    elif args.action == "down":
        stack.down()
    else:
        return stack.status()
    return 0


if __name__ == "__main__":
    sys.exit(main())

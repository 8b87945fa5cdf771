"""``make up`` / ``make down`` / ``make status``: the local stack, no Docker needed.

What runs where (all on loopback; every port can be moved with the variables in brackets):
    object store   MinIO at $MINIO_ENDPOINT, else the embedded FileStore in $REFIT_DATA_DIR/objects
    TorchServe     REST 8080-8082 [REFIT_TORCHSERVE_HTTP_PORTS], gRPC 7070/7071
                   [REFIT_TORCHSERVE_INFERENCE, REFIT_TORCHSERVE_MANAGEMENT]
    refit service  gRPC 50051 [REFIT_GRPC_ADDRESS], health 50054 [REFIT_HEALTH_ADDRESS],
                   metrics 9101 [REFIT_METRICS_ADDRESS]
    trainer        gRPC 50052 (internal) [REFIT_TRAINER_ADDRESS], health 50053
                   [REFIT_TRAINER_HEALTH_ADDRESS], metrics 9102 [REFIT_TRAINER_METRICS_ADDRESS]
    Prometheus     9090 [REFIT_PROMETHEUS_ADDRESS], when installed
State lives in $REFIT_DATA_DIR (default ./.refit) and survives ``make down && make up``.

Supervision: supervisord (the ``supervisor`` package) runs the four components as its children
and restarts any that exits, with backoff (see ``PROGRAM_DEFAULTS``). It is driven through its
XML-RPC socket in $REFIT_DATA_DIR/run, never through pid files: stopping signals only processes
it started itself (their process groups), so a stale pid can never hit an unrelated process.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from supervisor.xmlrpc import SupervisorTransport

from cli.client import ClientSettings, connect
from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.netutil import wait_serving
from refit.storage import StorageSettings
from refit.tokens import client_token, create_tokens_file, tokens_file

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.local.yml"
# Restart policy of every component (supervisor's program options): one that exits is started
# again at once; one that exits again within `startsecs` waits 1 s, 2 s, ... more each time and
# after `startretries` such quick failures is FATAL (`make status` shows it; `make up` retries).
PROGRAM_DEFAULTS = {
    "autostart": "true",
    "autorestart": "true",
    "startsecs": "5",
    "startretries": "10",
    "stopasgroup": "true",  # TorchServe's Java server and its workers, DataLoader workers
    "killasgroup": "true",
    "stopwaitsecs": "30",
    "redirect_stderr": "true",
    "stdout_logfile_maxbytes": "20MB",
    "stdout_logfile_backups": "3",
}
RUNNING_STATES = {"STARTING", "RUNNING", "BACKOFF"}  # alive, or about to be restarted


@dataclass(frozen=True)
class StackSettings:
    storage: StorageSettings
    bucket: str = "refit"
    grpc_address: str = "127.0.0.1:50051"
    health_address: str = "127.0.0.1:50054"  # the service's grpc.health.v1, apart from its API
    metrics_address: str = "127.0.0.1:9101"
    prometheus_address: str = "127.0.0.1:9090"
    scrape_interval: str = "15s"
    trainer_address: str = "127.0.0.1:50052"
    trainer_health_address: str = "127.0.0.1:50053"  # grpc.health.v1, apart from the job API
    trainer_metrics_address: str = "127.0.0.1:9102"
    torchserve: TorchServePorts = field(default_factory=TorchServePorts)

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir.resolve()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StackSettings:
        env = dict(os.environ if env is None else env)
        http = env.get("REFIT_TORCHSERVE_HTTP_PORTS", "8080,8081,8082").split(",")
        grpc_inference = env.get("REFIT_TORCHSERVE_INFERENCE", "127.0.0.1:7070")
        grpc_management = env.get("REFIT_TORCHSERVE_MANAGEMENT", "127.0.0.1:7071")
        return cls(
            storage=StorageSettings.from_env(env),
            bucket=env.get("REFIT_BUCKET", "refit"),
            grpc_address=env.get("REFIT_GRPC_ADDRESS", "127.0.0.1:50051"),
            health_address=env.get("REFIT_HEALTH_ADDRESS", "127.0.0.1:50054"),
            metrics_address=env.get("REFIT_METRICS_ADDRESS", "127.0.0.1:9101"),
            prometheus_address=env.get("REFIT_PROMETHEUS_ADDRESS", "127.0.0.1:9090"),
            trainer_address=env.get("REFIT_TRAINER_ADDRESS", "127.0.0.1:50052"),
            trainer_health_address=env.get("REFIT_TRAINER_HEALTH_ADDRESS", "127.0.0.1:50053"),
            trainer_metrics_address=env.get("REFIT_TRAINER_METRICS_ADDRESS", "127.0.0.1:9102"),
            torchserve=TorchServePorts(
                *(int(port) for port in http),
                grpc_inference=int(grpc_inference.rpartition(":")[2]),
                grpc_management=int(grpc_management.rpartition(":")[2]),
            ),
        )

    @property
    def torchserve_home(self) -> Path:
        """TorchServe's configuration, model store, logs and keys."""
        return self.data_dir / "torchserve"

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
            "REFIT_HEALTH_ADDRESS": self.health_address,
            "REFIT_METRICS_ADDRESS": self.metrics_address,
            "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{self.torchserve.grpc_inference}",
            "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{self.torchserve.grpc_management}",
            "REFIT_TORCHSERVE_MANAGEMENT_REST": f"127.0.0.1:{self.torchserve.management}",
            "REFIT_TORCHSERVE_METRICS": f"127.0.0.1:{self.torchserve.metrics}",
            # TorchServe's keys: its key file, which its keeper keeps current (torchserve_home).
            "REFIT_TORCHSERVE_KEYS": f"file:{self.torchserve_home / 'key_file.json'}",
            "REFIT_TRAINER_ADDRESS": self.trainer_address,
            "REFIT_TRAINER_GRPC_ADDRESS": self.trainer_address,
            "REFIT_TRAINER_HEALTH_ADDRESS": self.trainer_health_address,
            "REFIT_TRAINER_METRICS_ADDRESS": self.trainer_metrics_address,
            "REFIT_TOKENS_FILE": str(tokens_file(self.data_dir)),  # API tokens (refit.tokens)
        }


@dataclass(frozen=True)
class Program:
    """One supervised component: what to run, where, with which extra variables."""

    name: str
    command: list[str]
    directory: Path
    env: dict[str, str] = field(default_factory=dict)


class Supervisor:
    """supervisord for one data dir, driven over its unix socket (XML-RPC)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.run_dir = data_dir / "run"
        self.config_file = self.run_dir / "supervisord.conf"
        self.log_dir = data_dir / "logs"

    @property
    def socket(self) -> Path:
        path = self.run_dir / "supervisor.sock"
        if len(str(path)) < 100:
            return path
        # A unix socket path is limited to ~107 bytes: a deep data dir gets a short, stable name.
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"refit-{digest}.sock"

    def rpc(self) -> xmlrpc.client.ServerProxy:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def running(self) -> bool:
        try:
            return self.rpc().supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def start(self, programs: list[Program], env: dict[str, str]) -> None:
        """Starts supervisord with ``programs`` (it starts them); if it runs, (re)starts any of
        them that is not running."""
        if self.running():
            self.rpc().supervisor.reloadConfig()
            for info in self.rpc().supervisor.getAllProcessInfo():
                if info["statename"] not in RUNNING_STATES:
                    self.rpc().supervisor.startProcess(info["name"], False)
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.render(programs))
        supervisord = Path(sys.executable).with_name("supervisord")
        # supervisord daemonizes itself; it keeps this environment for its programs.
        subprocess.run(
            [str(supervisord), "-c", str(self.config_file)], env=env, cwd=self.data_dir, check=True
        )
        deadline = time.monotonic() + 30
        while not self.running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"supervisord did not start; see {self.log_dir}")
            time.sleep(0.1)

    def stop(self, timeout_s: float = 120.0) -> None:
        """Stops every program (their process groups), then supervisord itself."""
        if not self.running():
            return
        self.rpc().supervisor.shutdown()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.rpc().supervisor.getState()
            except OSError:  # its socket is closed: it is gone
                return
            except xmlrpc.client.Fault:  # SHUTDOWN_STATE: still stopping its programs
                pass
            time.sleep(0.2)
        raise TimeoutError(f"supervisord did not stop in {timeout_s:.0f}s; see {self.log_dir}")

    def states(self) -> dict[str, dict]:
        if not self.running():
            return {}
        return {info["name"]: info for info in self.rpc().supervisor.getAllProcessInfo()}

    def pid(self, name: str) -> int | None:
        info = self.states().get(name)
        return info["pid"] if info and info["pid"] else None

    def render(self, programs: list[Program]) -> str:
        sections = {
            "unix_http_server": {"file": str(self.socket), "chmod": "0700"},
            "supervisord": {
                "logfile": str(self.log_dir / "supervisord.log"),
                "pidfile": str(self.run_dir / "supervisord.pid"),  # for people; never read here
                "childlogdir": str(self.log_dir),
                "directory": str(self.data_dir),
            },
            "rpcinterface:supervisor": {
                "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
            },
            "supervisorctl": {"serverurl": f"unix://{self.socket}"},
        }
        for priority, program in enumerate(programs, start=1):
            sections[f"program:{program.name}"] = {
                **PROGRAM_DEFAULTS,
                "command": " ".join(_quote(arg) for arg in program.command),
                "directory": str(program.directory),
                "priority": str(priority * 10),  # started in this order, stopped in reverse
                "stdout_logfile": str(self.log_dir / f"{program.name}.log"),
                "environment": ",".join(f'{k}="{_escape(v)}"' for k, v in program.env.items()),
            }
        return "".join(
            f"[{name}]\n"
            + "".join(f"{k}={_escape_percent(v)}\n" for k, v in values.items() if v)
            + "\n"
            for name, values in sections.items()
        )


class Stack:
    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        data = settings.data_dir
        self.torchserve = TorchServeProcess(
            settings.torchserve_home, settings.torchserve, allowed_urls_for(settings.storage_url())
        )
        self.supervisor = Supervisor(data)
        self.prometheus_binary = shutil.which("prometheus")

    def programs(self) -> list[Program]:
        data = self.settings.data_dir
        ts_env = self.torchserve.env()
        programs = [
            Program(
                "torchserve",
                self.torchserve.command(),
                self.torchserve.home,
                {k: ts_env[k] for k in ("TMPDIR", "LOG_LOCATION", "METRICS_LOCATION")},
            ),
            Program(
                "trainer",
                [sys.executable, "-m", "trainer.server"],
                data,
                # DataLoader workers report metrics through files here (multiprocess mode).
                {"PROMETHEUS_MULTIPROC_DIR": str(data / "run" / "trainer-metrics")},
            ),
            Program("service", [sys.executable, "-m", "service.server"], data),
        ]
        if self.prometheus_binary:
            programs.append(
                Program(
                    "prometheus",
                    [
                        self.prometheus_binary,
                        f"--config.file={data / 'prometheus.yml'}",
                        f"--storage.tsdb.path={data / 'prometheus'}",
                        f"--web.listen-address={self.settings.prometheus_address}",
                    ],
                    data,
                )
            )
        return programs

    def up(self, timeout_s: float = 300.0) -> None:
        env = self.settings.service_env()
        _step("object store", self.settings.storage_url())
        subprocess.run(
            [sys.executable, "-m", "trainer.base_model", "--bucket", self.settings.bucket],
            env=env,
            check=True,
        )
        self.torchserve.prepare()
        (self.settings.data_dir / "run" / "trainer-metrics").mkdir(parents=True, exist_ok=True)
        if self.prometheus_binary:
            render_prometheus_config(self.settings, self.settings.data_dir / "prometheus.yml")
        if create_tokens_file(tokens_file(self.settings.data_dir)):
            _step("API tokens", f"{tokens_file(self.settings.data_dir)} (mode 0600)")
        self.supervisor.start(self.programs(), env)
        _step("supervisor", f"{self.supervisor.socket} (restarts crashed components)")
        self._wait_torchserve(timeout_s)
        _step("TorchServe", f"127.0.0.1:{self.settings.torchserve.grpc_inference} (gRPC)")
        self._wait(self.settings.trainer_health_address, timeout_s, "trainer")
        _step(
            "trainer",
            f"{self.settings.trainer_address} (metrics on "
            f"http://{self.settings.trainer_metrics_address}/metrics)",
        )
        if self.prometheus_binary:
            _step("Prometheus", f"http://{self.settings.prometheus_address}")
        else:
            _step("Prometheus", "not installed (apt-get install prometheus); skipped")
        try:
            self._wait(self.settings.health_address, timeout_s, "service")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self._model_report() or ''}".rstrip()) from exc
        _step(
            "refit service",
            f"{self.settings.grpc_address} (metrics on "
            f"http://{self.settings.metrics_address}/metrics)",
        )
        self._wait_running(timeout_s)
        if report := self._model_report():
            print(report)
        print(f"ready. logs: {self.settings.data_dir / 'logs'}; try: refit predict IMAGE")

    def _wait_torchserve(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.torchserve.is_healthy():
            self._check_alive("torchserve")
            if time.monotonic() > deadline:
                raise RuntimeError(f"TorchServe was not healthy after {timeout_s:.0f}s; "
                                   f"see {self.torchserve.home / 'logs'}")  # fmt: skip
            time.sleep(0.5)

    def _wait_running(self, timeout_s: float) -> None:
        """Until supervisord counts every program started (up `startsecs`), so that `make status`
        right after `make up` says RUNNING."""
        deadline = time.monotonic() + timeout_s
        while any(s["statename"] != "RUNNING" for s in self.supervisor.states().values()):
            for name in self.supervisor.states():
                self._check_alive(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every component was running after {timeout_s:.0f}s")
            time.sleep(0.2)

    def _wait(self, address: str, timeout_s: float, name: str) -> None:
        try:
            wait_serving(address, timeout_s, lambda: self._check_alive(name))
        except (RuntimeError, TimeoutError) as exc:
            log = self.settings.data_dir / "logs" / f"{name}.log"
            raise RuntimeError(f"{name}: {exc}; see {log}") from exc

    def _check_alive(self, name: str) -> bool:
        state = self.supervisor.states().get(name, {}).get("statename", "STOPPED")
        if state not in RUNNING_STATES:
            raise RuntimeError(f"{name} is {state} (it kept exiting at start)")
        return True

    def _model_report(self) -> str:
        """Versions TorchServe refused and models that cannot be served, if any."""
        try:
            tokens = {"REFIT_TOKENS_FILE": str(tokens_file(self.settings.data_dir))}
            client = ClientSettings(self.settings.grpc_address, token=client_token(tokens))
            with connect(client) as channel:
                from refit.v1 import refit_pb2 as pb
                from refit.v1 import refit_pb2_grpc

                stub = refit_pb2_grpc.RefitStub(channel)
                models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        except grpc.RpcError:
            return ""
        lines = []
        for model in models:
            if model.problem:
                lines.append(f"  ! {model.name}: {model.problem}")
            for v in model.versions:
                if v.registration == pb.ModelVersion.REGISTRATION_FAILED:
                    role = "default" if v.is_default else "not the default"
                    lines.append(
                        f"  ! {model.name} v{v.version} ({role}) cannot be loaded, retrying "
                        f"with backoff: {v.registration_error}"
                    )
        return "\n".join(lines)

    def down(self) -> None:
        self.supervisor.stop()
        print("stopped; state kept in", self.settings.data_dir)

    def status(self) -> int:
        states = self.supervisor.states()
        names = [p.name for p in self.programs()]
        for name in names:
            info = states.get(name)
            shown = f"{info['statename']:9} {info['description']}" if info else "stopped"
            print(f"{name:15} {shown}")
        healthy = all(states.get(n, {}).get("statename") == "RUNNING" for n in names)
        return 0 if healthy and self.torchserve.is_healthy() else 1


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


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _escape_percent(value: str) -> str:
    return value.replace("%", "%%")  # supervisor expands %(name)s in every value


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

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
and restarts any that exits, with backoff (local_stack/supervisor.py). Where each listens:
local_stack/settings.py; Prometheus's configuration: local_stack/prometheus.py.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time

import grpc

from cli.client import ClientSettings, connect
from local_stack.prometheus import render_prometheus_config
from local_stack.settings import StackSettings
from local_stack.supervisor import RUNNING_STATES, Program, Supervisor
from local_stack.torchserve import TorchServeProcess, allowed_urls_for
from refit.netutil import wait_serving
from refit.tokens import client_token, create_tokens_file, tokens_file


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

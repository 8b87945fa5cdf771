"""The stack the front-door benchmarks run against: the embedded store with imagenet v1, a real
TorchServe, the service as its own process (so its memory can be read) with fresh tokens, and
optionally the trainer as its own process. Everything on free loopback ports, torn down on exit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.netutil import free_port, wait_serving
from refit.storage import StorageSettings
from refit.tokens import ENV_NAMES, create_tokens_file, read_tokens_file, tokens_file
from refit.torchserve.keys import Keys
from trainer.base_model import publish_base_model


@dataclass(frozen=True)
class RunningStack:
    address: str
    admin_token: str
    predict_token: str
    service_pid: int
    data_dir: Path
    torchserve_inference: str  # TorchServe's gRPC inference address, for direct calls
    torchserve_inference_key: str  # its inference key (its token authorization is on)

    def rss_bytes(self) -> int:
        """The service process's resident memory, from /proc."""
        for line in Path(f"/proc/{self.service_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def running_stack(*, trainer: bool = False, env: dict[str, str] | None = None) -> Iterator:
    with tempfile.TemporaryDirectory(prefix="refit-bench-") as tmp:
        home = Path(tmp)
        publish_base_model(StorageSettings(data_dir=home).open(), "refit")
        ports = TorchServePorts(*(free_port() for _ in range(5)))
        torchserve = TorchServeProcess(
            home / "ts", ports, allowed_urls_for((home / "objects").as_uri())
        )
        create_tokens_file(tokens_file(home))
        tokens = read_tokens_file(tokens_file(home))
        common = {
            **os.environ,
            "REFIT_DATA_DIR": str(home),
            "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{ports.grpc_inference}",
            "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{ports.grpc_management}",
            "REFIT_TORCHSERVE_MANAGEMENT_REST": f"127.0.0.1:{ports.management}",
            "REFIT_TORCHSERVE_KEYS": torchserve.keys,
            "REFIT_TRAINER_ADDRESS": f"127.0.0.1:{free_port()}",
            **(env or {}),
        }
        processes: list[subprocess.Popen] = []
        torchserve.start()
        try:
            if trainer:
                processes.append(_start(home, "trainer", common, {
                    "REFIT_TRAINER_GRPC_ADDRESS": common["REFIT_TRAINER_ADDRESS"],
                    "REFIT_TRAINER_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
                    "REFIT_TRAINER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
                    "REFIT_TRAINER_DEVICE": "cpu",
                }))  # fmt: skip
            address = f"127.0.0.1:{free_port()}"
            service = _start(home, "service", common, {
                "REFIT_GRPC_ADDRESS": address,
                "REFIT_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
                "REFIT_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
                "REFIT_TOKENS_FILE": str(tokens_file(home)),
            })  # fmt: skip
            processes.append(service)
            yield RunningStack(
                address,
                tokens[ENV_NAMES["admin"]],
                tokens[ENV_NAMES["predict"]],
                service.pid,
                home,
                common["REFIT_TORCHSERVE_INFERENCE"],
                Keys.parse(torchserve.key_file.read_text()).inference,
            )
        finally:
            for process in reversed(processes):
                process.terminate()
                process.wait(30)
            torchserve.stop()


def _start(home: Path, name: str, common: dict, extra: dict) -> subprocess.Popen:
    env = {**common, **extra}
    log = (home / f"{name}.log").open("a")
    module = "trainer.server" if name == "trainer" else "service.server"
    process = subprocess.Popen(
        [sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    # Each answers health on a port of its own.
    address = env["REFIT_TRAINER_HEALTH_ADDRESS" if name == "trainer" else "REFIT_HEALTH_ADDRESS"]
    try:
        wait_serving(address, 300, lambda: process.poll() is None)
    except (RuntimeError, TimeoutError) as exc:
        log_tail = (home / f"{name}.log").read_text()[-2000:]
        raise RuntimeError(f"{name}: {exc}; its log ends:\n{log_tail}") from exc
    return process

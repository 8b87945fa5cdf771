"""Runs a TorchServe process with refit's hardened configuration (``make up`` and the tests).

TorchServe keeps its pid file in the temp dir, so each instance gets a private TMPDIR: two
instances (a test run beside ``make up``) never stop each other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TorchServePorts:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071


def allowed_urls_for(storage_url: str) -> str:
    """A regex admitting only archives under ``storage_url`` (SSRF guard, CVE-2023-43654)."""
    return re.escape(storage_url.rstrip("/")) + "/.*"


def render_config(ports: TorchServePorts, model_store: Path, allowed_urls: str) -> str:
    host = "127.0.0.1"
    lines = {
        "inference_address": f"http://{host}:{ports.inference}",
        "management_address": f"http://{host}:{ports.management}",
        "metrics_address": f"http://{host}:{ports.metrics}",
        "grpc_inference_address": host,
        "grpc_management_address": host,
        "grpc_inference_port": ports.grpc_inference,
        "grpc_management_port": ports.grpc_management,
        "model_store": model_store,
        # Only the object store may be a source of archives.
        "allowed_urls": allowed_urls.replace("\\", "\\\\"),
        # Register/unregister over the API: refit publishes versions at run time.
        "enable_model_api": "true",
        # Loopback only, reached by the refit service alone; token keys would expire hourly.
        "disable_token_authorization": "true",
        "metrics_mode": "prometheus",
        "default_workers_per_model": 1,
        "max_request_size": 16 << 20,
        "max_response_size": 16 << 20,
        "install_py_dep_per_model": "false",
    }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


class TorchServeProcess:
    def __init__(self, home: Path, ports: TorchServePorts, allowed_urls: str) -> None:
        self.home = Path(home).resolve()
        self.ports = ports
        self.allowed_urls = allowed_urls

    @property
    def model_store(self) -> Path:
        return self.home / "model-store"

    def _env(self) -> dict[str, str]:
        tmp = self.home / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "TMPDIR": str(tmp),
            "LOG_LOCATION": str(self.home / "logs"),
            "METRICS_LOCATION": str(self.home / "logs"),
        }

    def _cli(self, *args: str) -> int:
        torchserve = shutil.which("torchserve", path=str(Path(sys.executable).parent))
        log = self.home / "logs" / "torchserve-cli.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        # Output goes to a file, not a pipe: the Java server inherits it and outlives the CLI.
        with log.open("a") as out:
            return subprocess.run(
                [torchserve or "torchserve", *args],
                env=self._env(),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            ).returncode

    def start(self, timeout_s: float = 90.0) -> None:
        if self.is_healthy():
            return
        self.model_store.mkdir(parents=True, exist_ok=True)
        config = self.home / "config.properties"
        config.write_text(render_config(self.ports, self.model_store, self.allowed_urls))
        if self._cli("--start", "--ncs", "--ts-config", str(config)) != 0:
            raise RuntimeError(f"torchserve --start failed; see {self.home / 'logs'}")
        self._wait(self.is_healthy, timeout_s, "TorchServe did not become healthy")

    def stop(self, timeout_s: float = 30.0) -> None:
        pid = self.pid()
        self._cli("--stop")
        if pid is not None:
            self._wait(lambda: not _alive(pid), timeout_s, "TorchServe did not exit")

    def pid(self) -> int | None:
        pid_file = self.home / "tmp" / ".model_server.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def is_healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.ports.inference}/ping"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return b"Healthy" in response.read()
        except OSError:
            return False

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise TimeoutError(message)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it has exited for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False

"""Runs a TorchServe process with refit's hardened configuration (``make up`` and the tests).

TorchServe runs in the foreground (``torchserve --foreground``): it is a child of whoever started
it, the stack's supervisor (which runs ``command()``) or ``start()`` here (tests, benchmarks), so
it is watched and stopped through its parent, never through a pid file. It is started in its own
process group, and stopping signals that group: the Java server and its Python workers.

TorchServe keeps its pid file, and Java its worker sockets, in the temp dir, so each instance gets
a private one (TMPDIR and java.io.tmpdir): two instances (a test run beside ``make up``) never see
each other.

Its token authorization is on, as in production: it runs under deploy/torchserve/keeper.py, which
replaces its keys before they expire, and its keys are in ``key_file`` (the service and the
trainer read them: ``keys``; a TorchServeClient of this instance: ``key_source()``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from refit.torchserve.keys import FileKeys, KeysUnavailable
from refit.torchserve.targets import Replica

# Runs TorchServe with its token authorization on and replaces its keys before they expire.
KEEPER = Path(__file__).resolve().parents[1] / "deploy" / "torchserve" / "keeper.py"


@dataclass(frozen=True)
class TorchServePorts:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071


def allowed_urls_for(*storage_urls: str) -> str:
    """A regex admitting only archives under ``storage_urls`` (SSRF guard, CVE-2023-43654)."""
    return "|".join(re.escape(url.rstrip("/")) + "/.*" for url in storage_urls)


def render_config(
    ports: TorchServePorts,
    model_store: Path,
    allowed_urls: str,
    extra: Mapping[str, object] | None = None,
) -> str:
    """refit's configuration; ``extra`` adds or overrides properties (tests: a tiny
    ``job_queue_size``, for instance)."""
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
        # TorchServe's token authorization stays on (its default): every call carries this
        # instance's key from key_file.json, which deploy/torchserve/keeper.py replaces hourly.
        "metrics_mode": "prometheus",
        # A registration's initial_workers=0 means no worker only when this is 0 (gRPC reads 0
        # as "unset"): the service registers versions that are not a default without one.
        "default_workers_per_model": 0,
        "max_request_size": 16 << 20,
        "max_response_size": 16 << 20,
        "install_py_dep_per_model": "false",
    } | dict(extra or {})
    return "".join(f"{key}={value}\n" for key, value in lines.items())


class TorchServeProcess:
    def __init__(
        self,
        home: Path,
        ports: TorchServePorts,
        allowed_urls: str,
        extra_config: Mapping[str, object] | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        self.ports = ports
        self.allowed_urls = allowed_urls
        self.extra_config = dict(extra_config or {})
        self._process: subprocess.Popen | None = None

    @property
    def model_store(self) -> Path:
        return self.home / "model-store"

    @property
    def config_file(self) -> Path:
        return self.home / "config.properties"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "torchserve-cli.log"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TMPDIR": str(self.home / "tmp"),
            # Java ignores TMPDIR; its temp dir holds the worker sockets (.ts.sock.<port>), which
            # would otherwise collide between TorchServe instances on one host.
            "JAVA_TOOL_OPTIONS": f"-Djava.io.tmpdir={self.home / 'tmp'}",
            "LOG_LOCATION": str(self.home / "logs"),
            "METRICS_LOCATION": str(self.home / "logs"),
        }

    def prepare(self) -> None:
        """Writes the configuration and the directories ``command()`` needs."""
        for folder in (self.model_store, self.home / "tmp", self.home / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(
            render_config(self.ports, self.model_store, self.allowed_urls, self.extra_config)
        )

    @property
    def key_file(self) -> Path:
        """TorchServe's keys (its token authorization), written in its working directory."""
        return self.home / "key_file.json"

    @property
    def keys(self) -> str:
        """REFIT_TORCHSERVE_KEYS for the service and the trainer (refit/torchserve/keys.py)."""
        return f"file:{self.key_file}"

    def key_source(self) -> FileKeys:
        """The keys for a TorchServeClient of this instance's gRPC ports."""
        return FileKeys({f"127.0.0.1:{self.ports.grpc_management}": self.key_file})

    def describe(self, model: str, version: str = "") -> dict:
        """TorchServe's own view of a version (its REST describe, with the management key); no
        version: the model's default version. For tests and benchmarks."""
        keys = self.key_source().read(self._replica())
        path = f"models/{model}/{version}" if version else f"models/{model}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports.management}/{path}",
            headers=dict(keys.metadata("management")),
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            (answer,) = json.load(response)
        return answer

    def command(self) -> list[str]:
        """The foreground server under its key keeper; run it with ``env()``, in ``home`` (where
        TorchServe writes its keys), after ``prepare()``."""
        torchserve = shutil.which("torchserve", path=str(Path(sys.executable).parent))
        return [
            sys.executable,
            str(KEEPER),
            "--",
            torchserve or "torchserve",
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(self.config_file),
        ]

    def start(self, timeout_s: float = 90.0) -> None:
        """Runs it as our child (tests, benchmarks) and waits until it is healthy."""
        if self._process is not None and self._process.poll() is None:
            return
        self.prepare()
        with self.log_file.open("a") as log:
            self._process = subprocess.Popen(
                self.command(),
                env=self.env(),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() signals exactly it
            )
        deadline = time.monotonic() + timeout_s
        while not self.is_healthy():
            if self._process.poll() is not None:
                raise RuntimeError(f"TorchServe exited at start; see {self.home / 'logs'}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"TorchServe was not healthy after {timeout_s:.0f}s")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the TorchServe this object started (its process group), nothing else."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(10)
        _wait_group_gone(process.pid, 10.0)

    def kill(self) -> None:
        """A crash: SIGKILL to its whole process group (the Java server and its workers)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        _signal_group(process.pid, signal.SIGKILL)
        process.wait(10)
        _wait_group_gone(process.pid, 10.0)

    def server_pid(self) -> int | None:
        """The Java server's pid (TorchServe's pid file, in our private TMPDIR)."""
        try:
            pid = int((self.home / "tmp" / ".model_server.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def is_healthy(self) -> bool:
        """Its gRPC ports take connections and its REST ping answers Healthy (the ping, too,
        needs the inference key). The ping answers a moment before the gRPC ports open."""
        for port in (self.ports.grpc_inference, self.ports.grpc_management):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) != 0:
                    return False
        try:
            headers = dict(self.key_source().read(self._replica()).metadata("inference"))
        except KeysUnavailable:
            return False  # not written yet: TorchServe is still starting
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports.inference}/ping", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return b"Healthy" in response.read()
        except OSError:
            return False

    def _replica(self) -> Replica:
        management = f"127.0.0.1:{self.ports.grpc_management}"
        return Replica(management, f"127.0.0.1:{self.ports.grpc_inference}", management)


def _signal_group(pgid: int, sig: int) -> None:
    # Safe after the leader is reaped: Linux does not reuse a pid that still names a group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Workers may outlive the CLI by a moment: wait for the whole group, then kill what is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)


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

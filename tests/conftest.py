"""Shared fixtures: real servers on free loopback ports, always cleaned up."""

# free_port is re-exported for test modules: `from tests.conftest import free_port`.

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from deploy.containers import minio_init
from refit.netutil import free_port
from refit.storage import FileStore, S3Store, StorageSettings

ROOT = Path(__file__).resolve().parents[1]


def wait_for_port(
    port: int, timeout: float = 30.0, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> float:
    """Polls ``condition`` until it holds; the seconds that took. TimeoutError past
    ``timeout_s``, naming ``what`` was awaited."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what} not within {timeout_s:.0f}s")
        time.sleep(0.1)
    return time.monotonic() - start


class MotoServer:
    """The policed S3 stand-in for MinIO (deploy/containers/test/s3_standin.py: moto's S3, with
    MinIO's authentication, per-identity policies and admin calls), memory only, in a process
    of its own on a free port. ``settings`` are the root identity, for test code that plays the
    operator; ``identity()`` gives a component's least-privilege one, made as in production."""

    ROOT_USER = "refit-root"

    def __init__(self) -> None:
        self.port = free_port()
        self.root_password = secrets.token_urlsafe(24)
        self.process: subprocess.Popen | None = None
        self._identities: dict[str, StorageSettings] = {}

    def start(self) -> None:
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.ROOT_USER,
            "MINIO_ROOT_PASSWORD": self.root_password,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deploy.containers.test.s3_standin",
             "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    @property
    def settings(self) -> StorageSettings:
        return StorageSettings(
            endpoint=f"http://127.0.0.1:{self.port}",
            access_key=self.ROOT_USER,
            secret_key=self.root_password,
        )

    def identity(self, role: str, bucket: str, **read_only: str) -> StorageSettings:
        """The settings of ``role``'s identity ("service" or "trainer") for ``bucket``, with the
        policy minio_init ships (``read_only``: the trainer's ``datasets=``/``models=`` buckets).
        Made as minio-init makes it: the bucket, then the user and its policy through MinIO's
        admin API, under a name of its own per policy. The same call gives the same identity."""
        policy = minio_init.POLICIES[role](bucket, **read_only)
        digest = hashlib.sha256(json.dumps(policy, sort_keys=True).encode()).hexdigest()
        name = f"{role}-{bucket}-{digest[:8]}"
        if name not in self._identities:
            minio_init.create_buckets(S3Store(self.settings).client, [bucket])
            made = minio_init.Identity(name, secrets.token_urlsafe(24), policy)
            minio_init.create_identities(self.admin(), [made])
            self._identities[name] = replace(
                self.settings, access_key=name, secret_key=made.secret_key
            )
        return self._identities[name]

    def admin(self):
        """MinIO's admin client (minio-py), as the root."""
        from minio.credentials import StaticProvider
        from minio.minioadmin import MinioAdmin

        credentials = StaticProvider(self.ROOT_USER, self.root_password)
        return MinioAdmin(endpoint=f"127.0.0.1:{self.port}", credentials=credentials, secure=False)


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_store(moto_server: MotoServer) -> S3Store:
    return S3Store(moto_server.settings)


@pytest.fixture
def bucket(s3_store: S3Store) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_store.ensure_bucket(name)
    return name


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "objects")


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    from skimage import data

    return encode(Image.fromarray(data.coffee()))


@pytest.fixture(scope="session")
def cat_jpeg() -> bytes:
    from skimage import data

    return encode(Image.fromarray(data.chelsea()))

"""Shared fixtures: real servers on free loopback ports, always cleaned up."""

# free_port is re-exported for test modules: `from tests.conftest import free_port`.

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from refit.netutil import free_port
from refit.storage import FileStore, S3Store, StorageSettings


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


class MotoServer:
    """moto's S3 server (memory only, no auth): the test stand-in for MinIO."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        moto = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    @property
    def settings(self) -> StorageSettings:
        return StorageSettings(
            endpoint=f"http://127.0.0.1:{self.port}", access_key="test", secret_key="test"
        )


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

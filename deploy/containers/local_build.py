"""Builds refit's images on a host that reaches package registries but no image registry, the
way this project's machines and CI do (`make images`, `make test-containers`):

1. a local Debian 12 base image (Python 3.11, the line of python:3.11-slim-bookworm), made with
   mmdebstrap and `docker import`, kept between runs under a tag derived from its recipe;
2. the host's CA bundle in deploy/containers/ca/, for networks that intercept TLS;
3. pip's local mirrors (the file:// indexes in pip's configuration), served over HTTP on
   loopback while the images build on the host network;
4. `docker-compose build`, one image at a time, so that the torchserve and trainer images
   share one torch layer instead of building it twice in parallel.

Usage: python deploy/containers/local_build.py [SERVICE...]   (default: the test stack's)
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.test.yml")
# The images of the test stack, cheapest first; the one compose service named per image.
SERVICES = ("minio", "prometheus", "service", "torchserve", "trainer-cpu")
BASE_RECIPE = (
    "mmdebstrap",
    "--variant=minbase",
    "--include=python3,python3-venv,ca-certificates,passwd",
    # As in Debian's slim images: no docs, man pages or translations.
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "bookworm",
)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = ROOT / "deploy" / "containers" / "ca" / "host-ca-bundle.crt"
# The mirror's URL is a build argument, so it is part of the build cache key: a stable port
# keeps the cache valid between runs. Any free port is used when this one is taken.
MIRROR_PORT = 39137


def log(message: str) -> None:
    print(f"[local_build] {message}", file=sys.stderr, flush=True)


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


def image_exists(name: str) -> bool:
    probe = subprocess.run(["docker", "image", "inspect", name], capture_output=True)
    return probe.returncode == 0


def base_image() -> str:
    """The local base image's tag; made (about a minute) only when missing."""
    tag = "refit-local-base:bookworm-" + hashlib.sha256(" ".join(BASE_RECIPE).encode()).hexdigest()
    tag = tag[: len("refit-local-base:bookworm-") + 12]
    if image_exists(tag):
        log(f"base image {tag}: present")
        return tag
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = Path(tmp) / "base.tar"
        run(*BASE_RECIPE, str(tarball), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run("docker", "import", str(tarball), tag, stdout=subprocess.DEVNULL)
    log(f"base image {tag}: made in {time.monotonic() - started:.0f} s")
    return tag


def install_host_ca() -> None:
    """Copies the host's CA bundle into the build context, unchanged files left alone (cache)."""
    if HOST_CA_BUNDLE.exists() and not (
        BUILD_CA.exists() and filecmp.cmp(HOST_CA_BUNDLE, BUILD_CA, shallow=False)
    ):
        shutil.copyfile(HOST_CA_BUNDLE, BUILD_CA)


def local_indexes() -> list[Path]:
    """Directories of the file:// package indexes in pip's configuration (none: [])."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    urls = []
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(("index-url", "extra-index-url")):
            urls += value.strip("'\"").split()
    return [Path(urlparse(u).path) for u in urls if u.startswith("file://")]


@contextlib.contextmanager
def serve_indexes(indexes: list[Path]) -> Iterator[dict[str, str]]:
    """Serves the indexes' common parent on loopback; yields the build's pip variables."""
    if not indexes:
        yield {}
        return
    root = Path(os.path.commonpath(indexes))
    handler = functools.partial(QuietHandler, directory=str(root))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", MIRROR_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="pip-mirror")
    thread.start()
    urls = [f"http://127.0.0.1:{port}/{i.relative_to(root)}" for i in indexes]
    log(f"pip mirrors {', '.join(map(str, indexes))} on http://127.0.0.1:{port}")
    try:
        yield {"REFIT_PIP_EXTRA_INDEX_URL": " ".join(urls), "REFIT_PIP_TRUSTED_HOST": "127.0.0.1"}
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


def compose_command(project: str, env_file: Path | None = None) -> list[str]:
    command = ["docker-compose", "--project-directory", str(ROOT), "-p", project]
    for name in COMPOSE_FILES:
        command += ["-f", str(ROOT / name)]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    return [*command, "--profile", "cpu"]


def build(compose: list[str], env: dict[str, str], services=SERVICES) -> dict[str, float]:
    """Builds each service's image in turn; returns the seconds each took."""
    install_host_ca()
    seconds = {}
    with serve_indexes(local_indexes()) as pip_env:
        build_env = {**os.environ, **env, **pip_env}
        for service in services:
            started = time.monotonic()
            # Docker's build log to stderr: stdout stays for what the caller prints.
            run(*compose, "build", service, env=build_env, cwd=ROOT, stdout=sys.stderr)
            seconds[service] = time.monotonic() - started
            log(f"built {service} in {seconds[service]:.0f} s")
    return seconds


def build_env() -> dict[str, str]:
    """The variables the test override needs to build: the local base image."""
    return {"REFIT_BASE_IMAGE": base_image()}


def main(argv: list[str]) -> None:
    env = build_env()
    # Compose interpolates every file; these values only satisfy the required variables.
    placeholders = dict.fromkeys(required_variables(), "build-only-placeholder")
    build(compose_command("refit"), {**placeholders, **env}, tuple(argv) or SERVICES)


def required_variables() -> list[str]:
    text = "".join((ROOT / name).read_text() for name in COMPOSE_FILES)
    return sorted(set(re.findall(r"\$\{([A-Z_]+):\?", text)) - {"REFIT_BASE_IMAGE"})


if __name__ == "__main__":
    main(sys.argv[1:])

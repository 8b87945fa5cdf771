"""Runs TorchServe with its token authorization on, and keeps refit's copy of its keys current.

    python keeper.py [--publish] -- torchserve --start --foreground --ts-config FILE ...

TorchServe (0.12) makes three random keys when it starts and writes them to ``key_file.json`` in
its working directory: a management key and an inference key, which every call must carry
(``authorization: Bearer KEY``) and which expire after ``token_expiration_min`` (60 by default),
and an API key, which only replaces them (``GET /token?type=management|inference`` on the
management port). This program:

- starts the command (TorchServe in the foreground) as its child, in this working directory, and
  passes SIGTERM/SIGINT on to its process group; it exits when TorchServe's CLI has and the rest
  of TorchServe (its Java server, its workers) is gone too, with the CLI's exit status;
- replaces the management and inference keys once half their lifetime has passed, so a key
  that leaks is good for at most ``token_expiration_min``;
- with ``--publish``, writes the management and inference keys (never the API key) to the object
  store, ``s3://REFIT_BUCKET/torchserve/keys/<replica>.json``, whenever they change: that is how
  the refit service and the trainer, on other hosts, get them (refit/torchserve/keys.py; only
  their identities may read there, only TorchServe's may write). ``<replica>`` is this host's
  address, the one the service reaches it by (REFIT_TORCHSERVE_REPLICA overrides it). A key is
  replaced only while the store takes writes, so that a store outage cannot leave refit with keys
  TorchServe no longer accepts.

Without ``--publish`` (``make up``, the tests) refit reads ``key_file.json`` itself.

Standard library and ``minio`` only: it runs in the TorchServe image, which holds no refit code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

log = logging.getLogger("torchserve-keeper")
KEY_FILE = "key_file.json"
KEYS_PREFIX = "torchserve/keys/"
DEFAULT_LIFETIME_MIN = 60.0  # TorchServe's token_expiration_min default
POLL_S = 1.0
# How long the keeper waits for TorchServe's server and workers to end before it kills them:
# under the 30 s that supervisord, compose and k8s give it before they kill the keeper.
STOP_WAIT_S = 20.0


@dataclass(frozen=True)
class Keys:
    management: str
    inference: str
    api: str
    expires: datetime  # the earlier of the two expirations

    @classmethod
    def read(cls, path: Path) -> Keys | None:
        """The key file's keys; None while TorchServe has not written it (or is writing it)."""
        try:
            data = json.loads(path.read_text())
            expires = min(
                _instant(data["management"]["expiration time"]),
                _instant(data["inference"]["expiration time"]),
            )
            return cls(
                data["management"]["key"], data["inference"]["key"], data["API"]["key"], expires
            )
        except (OSError, ValueError, KeyError):
            return None

    def published(self) -> bytes:
        """What refit reads: no API key (it can mint new keys)."""
        document = {
            "management": self.management,
            "inference": self.inference,
            "expires": self.expires.isoformat(),
        }
        return json.dumps(document).encode()


def _instant(text: str) -> datetime:
    # TorchServe writes nanoseconds ("2026-12-07T19:41:50.482112254Z"): keep microseconds.
    text = re.sub(r"(\.\d{6})\d*", r"\1", text.rstrip("Z"))
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass(frozen=True)
class Settings:
    """What the keeper reads from TorchServe's configuration file."""

    management_url: str  # REST management API, reached on loopback
    lifetime: timedelta

    @classmethod
    def from_config(cls, command: list[str]) -> Settings:
        properties: dict[str, str] = {}
        if "--ts-config" in command:
            text = Path(command[command.index("--ts-config") + 1]).read_text()
            for line in text.splitlines():
                key, sep, value = line.partition("=")
                if sep and not line.lstrip().startswith("#"):
                    properties[key.strip()] = value.strip()
        address = properties.get("management_address", "http://127.0.0.1:8081")
        port = address.rsplit(":", 1)[1]
        lifetime = float(properties.get("token_expiration_min", DEFAULT_LIFETIME_MIN))
        return cls(f"http://127.0.0.1:{port}", timedelta(minutes=lifetime))


class Publisher:
    """Writes the keys to the object store (MINIO_ENDPOINT, MINIO_ACCESS_KEY, MINIO_SECRET_KEY,
    MINIO_REGION, REFIT_BUCKET), under this replica's name."""

    def __init__(self, env: os._Environ | dict[str, str]) -> None:
        from minio import Minio

        endpoint = env["MINIO_ENDPOINT"]
        self.client = Minio(
            endpoint.split("://", 1)[-1],
            access_key=env["MINIO_ACCESS_KEY"],
            secret_key=env["MINIO_SECRET_KEY"],
            secure=endpoint.startswith("https://"),
            region=env.get("MINIO_REGION", "us-east-1"),
        )
        self.bucket = env.get("REFIT_BUCKET", "refit")
        self.key = KEYS_PREFIX + (env.get("REFIT_TORCHSERVE_REPLICA") or own_address()) + ".json"

    def publish(self, keys: Keys) -> bool:
        body = keys.published()
        try:
            self.client.put_object(self.bucket, self.key, io.BytesIO(body), len(body))
        except Exception as exc:  # any failure: the store is out of reach; retried
            log.warning("could not publish TorchServe's keys to s3://%s/%s: %s",
                        self.bucket, self.key, exc)  # fmt: skip
            return False
        log.info("published TorchServe's keys to s3://%s/%s", self.bucket, self.key)
        return True


def own_address() -> str:
    """This host's address on its network (what a DNS name of the replicas resolves to)."""
    return socket.gethostbyname(socket.gethostname())


def rotate(settings: Settings, keys: Keys) -> None:
    """New management and inference keys (TorchServe's token API, with the API key)."""
    for kind in ("management", "inference"):
        request = urllib.request.Request(
            f"{settings.management_url}/token?type={kind}",
            headers={"Authorization": f"Bearer {keys.api}"},
        )
        with urllib.request.urlopen(request, timeout=10):
            pass
    log.info("replaced TorchServe's management and inference keys")


class Keeper:
    def __init__(self, command: list[str], publisher: Publisher | None) -> None:
        self.command = command
        self.publisher = publisher
        self.settings = Settings.from_config(command)
        self.key_file = Path.cwd() / KEY_FILE
        self.child: subprocess.Popen | None = None
        self.published: Keys | None = None  # the keys the store holds
        self._forwarding = False

    def run(self) -> int:
        self.key_file.unlink(missing_ok=True)  # left by an earlier run: never publish stale keys
        self.child = subprocess.Popen(self.command)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._forward)
        while self.child.poll() is None:
            try:
                self.tend()
            except Exception:
                log.exception("keeping TorchServe's keys failed; retrying")
            time.sleep(POLL_S)
        wait_for_the_group()
        return self.child.returncode

    def tend(self) -> None:
        keys = Keys.read(self.key_file)
        if keys is None or not self._share(keys):
            return
        if datetime.now(UTC) < keys.expires - self.settings.lifetime / 2:
            return
        # Only while the store takes writes (this one re-writes the current keys): new keys that
        # could not be published would lock refit out until the store came back.
        if self.publisher is not None and not self.publisher.publish(keys):
            return
        rotate(self.settings, keys)
        rotated = Keys.read(self.key_file)
        if rotated is not None:
            self._share(rotated)  # at once: until then refit holds keys TorchServe refuses

    def _share(self, keys: Keys) -> bool:
        """Whether refit can read ``keys`` (publishing them first when they are new)."""
        if self.publisher is None or keys == self.published:
            return True
        if not self.publisher.publish(keys):
            return False
        self.published = keys
        return True

    def _forward(self, signum: int, _frame) -> None:
        """To TorchServe's whole process group: its CLI, and the Java server and workers it
        started (the CLI alone would leave Java running). The keeper shares that group, so it
        ignores the echo."""
        if self.child is None or self.child.poll() is not None or self._forwarding:
            return
        self._forwarding = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(os.getpgid(self.child.pid), signum)


def wait_for_the_group(timeout_s: float = STOP_WAIT_S) -> None:
    """After the CLI exits: until the rest of this process group (TorchServe's Java server and
    its workers, which a stop signals too but which take seconds to end) is gone, killed after
    ``timeout_s``. Whoever waits for this process to end (supervisord, Docker, a test) then finds
    TorchServe's ports free."""
    deadline = time.monotonic() + timeout_s
    while (others := others_in_the_group()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in others:  # past the wait: never leave a server holding the ports behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def others_in_the_group() -> list[int]:
    """The other live processes of this process group (Linux: from /proc)."""
    group, me, found = os.getpgrp(), os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            found.append(int(entry.name))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publish", action="store_true", help="write the keys to the store")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- torchserve ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give TorchServe's command after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    publisher = Publisher(os.environ) if args.publish else None
    return Keeper(command, publisher).run()


if __name__ == "__main__":
    sys.exit(main())

"""The compose stack on this machine's engine, for the container test and the benchmark.

docker-compose.yml with docker-compose.test.yml (the images this machine cannot obtain, replaced),
under a project name of its own, with random secrets and tokens in an env file of its own (never
the repository's .env), the `cpu` trainer profile, and `down -v` on the way out whatever happened.
It runs two service replicas, each on a port of a free range of its own, and two TorchServe
replicas, as the Kubernetes base does. It can run beside a `make up` stack.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from deploy.containers import local_build
from refit.netutil import free_port
from refit.v1 import refit_pb2, refit_pb2_grpc

ROOT = local_build.ROOT


def token() -> str:
    return secrets.token_urlsafe(24)


REPLICAS = 2  # of the service and of TorchServe


@dataclass
class ComposeStack:
    workdir: Path
    project: str = field(default_factory=lambda: f"refit-e2e-{secrets.token_hex(4)}")
    prometheus_port: int = field(default_factory=free_port)
    admin_token: str = field(default_factory=token)
    predict_token: str = field(default_factory=token)
    root_user: str = "refit-root"
    root_password: str = field(default_factory=token)

    def __post_init__(self) -> None:
        self.env_file = self.workdir / f"{self.project}.env"
        values = {
            # A range, one port per service replica: a restarted replica gets its port back.
            "REFIT_GRPC_PORT": free_port_range(REPLICAS),
            "REFIT_SERVICE_REPLICAS": REPLICAS,
            "REFIT_TORCHSERVE_REPLICAS": REPLICAS,
            "PROMETHEUS_PORT": self.prometheus_port,
            "GRAFANA_PORT": free_port(),  # Grafana is not started here; the file must resolve
            "MINIO_ROOT_USER": self.root_user,
            "MINIO_ROOT_PASSWORD": self.root_password,
            "MINIO_SERVICE_SECRET_KEY": token(),
            "MINIO_TRAINER_SECRET_KEY": token(),
            "MINIO_TORCHSERVE_SECRET_KEY": token(),
            "GRAFANA_ADMIN_PASSWORD": token(),
            "REFIT_ADMIN_TOKEN": self.admin_token,
            "REFIT_PREDICT_TOKEN": self.predict_token,
            "REFIT_BASE_IMAGE": local_build.base_image(),
        }
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        self.env_file.chmod(0o600)

    @property
    def addresses(self) -> list[str]:
        """Each service replica's published address, in replica order."""
        return [self.published("service", 50051, index) for index in range(1, REPLICAS + 1)]

    @property
    def address(self) -> str:
        """The first service replica's address."""
        return self.addresses[0]

    def published(self, service: str, port: int, index: int = 1) -> str:
        """The host address that publishes ``port`` of the service's ``index``-th container."""
        answer = self.compose("port", f"--index={index}", service, str(port)).strip()
        if not answer:
            raise RuntimeError(f"{service} #{index} publishes no port {port}")
        return answer

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def network(self) -> str:
        return f"{self.project}_backend"

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> str:
        command = [*local_build.compose_command(self.project, self.env_file), *args]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result.stdout

    def build(self) -> dict[str, float]:
        """Builds every image of the stack; the seconds each took."""
        return local_build.build(local_build.compose_command(self.project, self.env_file), {})

    def up(self) -> float:
        """`up -d`, which returns once every dependency condition held; the seconds it took."""
        started = time.monotonic()
        self.compose("up", "-d", "--no-build")
        return time.monotonic() - started

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "30", check=False)
        self.env_file.unlink(missing_ok=True)

    def container(self, service: str, index: int | None = None) -> str:
        """The id of the service's container (``index``: its index-th replica, from 1)."""
        ids = self.containers(service)
        if index is None and len(ids) != 1:
            raise RuntimeError(f"{service}: expected one container, found {ids}")
        return ids[(index or 1) - 1]

    def containers(self, service: str) -> list[str]:
        """The ids of the service's containers, in replica order."""
        project = f"label=com.docker.compose.project={self.project}"
        role = f"label=com.docker.compose.service={service}"
        number = '{{.ID}} {{.Label "com.docker.compose.container-number"}}'
        rows = docker("ps", "-a", "--filter", project, "--filter", role, "--format", number)
        rows = rows.splitlines()
        pairs = sorted((int(n), cid) for cid, n in (row.split() for row in rows if row.strip()))
        return [cid for _, cid in pairs]

    def inspect(self, container: str) -> dict:
        return json.loads(docker("inspect", container))[0]

    def logs(self, tail: int = 80) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), check=False)

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, volumes and networks of this project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        return {
            kind: docker(*command, "--filter", label, "-q").split()
            for kind, command in {
                "containers": ("ps", "-a"),
                "volumes": ("volume", "ls"),
                "networks": ("network", "ls"),
            }.items()
        }

    def predict(
        self, image: bytes, model: str = "imagenet", timeout: float = 30, address: str = ""
    ):
        """One Predict through a published port (the first replica's unless told), as an admin."""
        with grpc.insecure_channel(address or self.address) as channel:
            return refit_pb2_grpc.RefitStub(channel).Predict(
                refit_pb2.PredictRequest(image=image, model=model, top_k=5),
                metadata=[("authorization", f"Bearer {self.admin_token}")],
                timeout=timeout,
            )

    def wait_until_predicts(self, image: bytes, timeout: float = 300, model: str = "imagenet"):
        """Retries Predict until it answers; the answer."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.predict(image, model)
            except grpc.RpcError as error:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no Predict answer after {timeout:.0f} s") from error
            time.sleep(0.5)

    def aws(self, *args: str, mount: Path | None = None) -> str:
        """awscli (from the S3 stand-in's image) in a container on the stack's backend network,
        as the object store's root user (an operator uploading datasets, inspecting buckets);
        ``mount``: a host folder seen as /data."""
        volume = ["-v", f"{mount}:/data:ro"] if mount else []
        keys = ["-e", f"AWS_ACCESS_KEY_ID={self.root_user}",
                "-e", f"AWS_SECRET_ACCESS_KEY={self.root_password}"]  # fmt: skip
        return docker(
            "run", "--rm", "--network", self.network, *volume, *keys,
            "-e", "AWS_DEFAULT_REGION=us-east-1", "refit-test-s3:local",
            "aws", "--endpoint-url", "http://minio:9000", *args,
        )  # fmt: skip

    def cli_env(self) -> dict[str, str]:
        """What the refit CLI on the host needs to reach this stack as an admin."""
        return {"REFIT_ADDRESS": self.address, "REFIT_TOKEN": self.admin_token}


def docker(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
    return result.stdout


def free_port_range(count: int) -> str:
    """``FIRST-LAST``: ``count`` consecutive ports free on 127.0.0.1 now."""
    while True:
        first = free_port()
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return f"{first}-{first + count - 1}"

"""Container health probe for Docker's HEALTHCHECK: exit 0 when healthy, 1 otherwise.

    healthcheck.py grpc ADDRESS            grpc.health.v1 answers SERVING (the service, the trainer)
    healthcheck.py http URL [KEY_FILE]     the URL answers 2xx (TorchServe's /ping); KEY_FILE:
                                           TorchServe's key_file.json, whose inference key the
                                           request carries (its token authorization is on)

ADDRESS may be ``env:NAME``: the address the server binds, read from that variable, with a
wildcard host (0.0.0.0, [::]) probed on loopback. grpc is imported only for grpc probes, so the
TorchServe image needs none of it.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request

TIMEOUT_S = 3.0
WILDCARDS = {"0.0.0.0", "[::]", ""}


def probe_address(spec: str) -> str:
    address = os.environ[spec.removeprefix("env:")] if spec.startswith("env:") else spec
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in WILDCARDS else address


def grpc_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(probe_address(address)) as channel:
        request = health_pb2.HealthCheckRequest()
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT_S)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str, key_file: str = "") -> bool:
    try:
        headers = {"Authorization": f"Bearer {inference_key(key_file)}"} if key_file else {}
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError, KeyError):  # no key file yet: TorchServe is still starting
        return False


def inference_key(key_file: str) -> str:
    with open(key_file) as keys:
        return json.load(keys)["inference"]["key"]


def main(argv: list[str]) -> int:
    if argv[:1] == ["grpc"] and len(argv) == 2:
        healthy = grpc_serving(argv[1])
    elif argv[:1] == ["http"] and len(argv) in (2, 3):
        healthy = http_ok(*argv[1:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A channel to the refit service, as the CLI, the demo and the benchmarks open it: the bearer
token on every call, and TLS when a CA is given.

Environment: ``REFIT_TOKEN`` (else the local stack's tokens file, see refit.tokens),
``REFIT_TLS_CA_FILE`` (trust this CA: the channel uses TLS), and for client certificates
``REFIT_TLS_CLIENT_CERT_FILE`` with ``REFIT_TLS_CLIENT_KEY_FILE``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from refit.settings import field_for, from_env, setting
from refit.shared_settings import SERVICE_ADDRESS
from refit.tokens import client_token


@dataclass(frozen=True)
class ClientSettings:
    address: str = field_for(SERVICE_ADDRESS)
    token: str = field(default="", repr=False)  # refit.tokens.client_token
    ca_file: Path | None = setting(
        "REFIT_TLS_CA_FILE", None, "CA the CLI trusts; set: the channel uses TLS", parse=Path
    )
    cert_file: Path | None = setting(
        "REFIT_TLS_CLIENT_CERT_FILE",
        None,
        "the CLI's client certificate (PEM), for a service that demands one",
        parse=Path,
    )
    key_file: Path | None = setting(
        "REFIT_TLS_CLIENT_KEY_FILE", None, "the client certificate's private key", parse=Path
    )

    @classmethod
    def from_env(cls, address: str, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        return from_env(cls, env, address=address, token=client_token(env))


def connect(settings: ClientSettings) -> grpc.Channel:
    if settings.ca_file is None:
        channel = grpc.insecure_channel(settings.address)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=settings.ca_file.read_bytes(),
            private_key=settings.key_file.read_bytes() if settings.key_file else None,
            certificate_chain=settings.cert_file.read_bytes() if settings.cert_file else None,
        )
        channel = grpc.secure_channel(settings.address, credentials)
    if settings.token:
        channel = grpc.intercept_channel(channel, BearerToken(settings.token))
    return channel


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerToken(***)"

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def _call(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    intercept_unary_unary = _call
    intercept_unary_stream = _call
    intercept_stream_unary = _call
    intercept_stream_stream = _call

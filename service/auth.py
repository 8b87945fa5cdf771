"""Who may call what: bearer tokens with two roles, checked on a call's headers before its
message is read or any servicer code runs (service/frontdoor.py).

- ``predict``: the read and predict RPCs below (PREDICT_RPCS); ``admin``: every RPC.
- A missing or unknown token is UNAUTHENTICATED; a known token whose role does not cover the RPC
  is PERMISSION_DENIED. Health and reflection stay open. A method not listed here needs admin.
- Tokens are compared in constant time (``hmac.compare_digest`` on their SHA-256, so neither the
  content nor the length leaks), every configured token every time. No token is ever logged;
  failures are counted in ``refit_auth_failures_total{method,reason}``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc

from refit.settings import declare
from refit.tokens import ADMIN, PREDICT, TokenConfigError, role_tokens

OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
INSECURE_NO_AUTH = declare(
    "REFIT_INSECURE_NO_AUTH",
    False,
    "serve every RPC to anyone, without tokens: local development only",
)
PREDICT_RPCS = frozenset(
    {"Predict", "PredictStream", "ListModels", "GetModel", "GetJob", "ListJobs", "WatchJob"}
)
# The Open Inference Protocol (service/inference_protocol.py): read-only, so the predict role's.
INFERENCE_PROTOCOL_RPCS = frozenset(
    {"ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer"}
)


@dataclass(frozen=True)
class AuthSettings:
    """Each role's accepted tokens. ``enabled=False`` only with REFIT_INSECURE_NO_AUTH."""

    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    predict_tokens: tuple[str, ...] = field(default=(), repr=False)
    enabled: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AuthSettings:
        if INSECURE_NO_AUTH.value(env):
            return cls(enabled=False)
        roles = role_tokens(env)
        return cls(tuple(roles[ADMIN]), tuple(roles[PREDICT])).checked()

    def checked(self) -> AuthSettings:
        """Security by default: no tokens and no explicit opt-out means no service."""
        if self.enabled and not self.admin_tokens and not self.predict_tokens:
            raise TokenConfigError(
                "no API tokens: set REFIT_ADMIN_TOKEN and REFIT_PREDICT_TOKEN (or "
                "REFIT_TOKENS_FILE); for local development only, REFIT_INSECURE_NO_AUTH=true "
                "serves every RPC to anyone"
            )
        return self


def may_call(role: str, rpc: str) -> bool:
    predict_may = rpc in PREDICT_RPCS or rpc in INFERENCE_PROTOCOL_RPCS
    return role == ADMIN or (role == PREDICT and predict_may)


class Authenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self._digests = [(_digest(t), ADMIN) for t in settings.admin_tokens]
        self._digests += [(_digest(t), PREDICT) for t in settings.predict_tokens]

    def denial(self, rpc: str, authorization: str) -> tuple[str, grpc.StatusCode, str] | None:
        """Why a call to ``rpc`` with this ``authorization`` header is refused (the reason for
        the failures metric, the status, the message); None: it may go ahead."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return (
                "missing",
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send the metadata 'authorization: Bearer <token>' "
                "(the refit CLI sends REFIT_TOKEN)",
            )
        role = self.role_of(token.strip())
        if role is None:
            return "invalid", grpc.StatusCode.UNAUTHENTICATED, "invalid token"
        if not may_call(role, rpc):
            return (
                "forbidden",
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {role} token may not call {rpc or 'this method'}; it needs an admin token",
            )
        return None

    def role_of(self, token: str) -> str | None:
        """The token's role, or None. Compares against every token, in constant time."""
        digest, found = _digest(token), None
        for known, role in self._digests:
            if hmac.compare_digest(digest, known):
                found = role
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()

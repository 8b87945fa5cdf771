"""SigV4 as the S3 stand-in checks it (deploy/containers/test/s3_standin.py): requests signed in
the Authorization header (MinIO's admin calls) and presigned URLs, signature and expiry, against
the secrets of the stand-in's identities. ``Refused`` is a request the stand-in answers itself
with an S3 error, here and in its admin API."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
BAD_QUERY = "AuthorizationQueryParametersError"  # a presigned query that is not SigV4
MAX_EXPIRES_S = 7 * 24 * 3600  # SigV4's limit for a presigned URL
PRESIGN_PARAMS = frozenset(
    {"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires"}
    | {"X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token"}
)

Secrets = Callable[[str], "str | None"]  # access key -> secret key, None when unknown


class Refused(Exception):
    """A request the stand-in answers itself with an S3 error (MinIO's code and message)."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class Signature:
    """What a SigV4 request claims: who signed it, when, for which scope, over which headers."""

    access_key: str
    amz_date: str  # 20261207T120000Z
    scope: str  # 20261207/us-east-1/s3/aws4_request
    signed_headers: tuple[str, ...]
    signature: str

    @property
    def region(self) -> str:
        return self.scope.split("/")[1]

    @classmethod
    def from_credential(cls, credential: str, **fields) -> Signature:
        access_key, _, scope = credential.partition("/")
        if len(scope.split("/")) != 4 or not scope.endswith("/aws4_request"):
            raise Refused(BAD_QUERY, f"malformed credential {scope!r}", 400)
        return cls(access_key=access_key, scope=scope, **fields)


def encode(text: str) -> str:
    return quote(text, safe="-_.~")


def query_pairs(query: str) -> list[tuple[str, str]]:
    """The raw query string's parameters, decoded, in order."""
    pairs = []
    for part in filter(None, query.split("&")):
        name, _, value = part.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def canonical_request(
    method: str,
    raw_path: str,
    query: Iterable[tuple[str, str]],
    headers: dict[str, str],
    signed: Signature,
    payload_hash: str,
) -> str:
    """SigV4's canonical request; S3 keeps the path as sent (no normalizing, no re-encoding)."""
    canonical_query = "&".join(
        f"{k}={v}" for k, v in sorted((encode(k), encode(v)) for k, v in query)
    )
    lines = [f"{name}:{' '.join(headers.get(name, '').split())}" for name in signed.signed_headers]
    return "\n".join(
        [
            method,
            raw_path or "/",
            canonical_query,
            *lines,
            "",
            ";".join(signed.signed_headers),
            payload_hash,
        ]
    )


def expected_signature(secret_key: str, signed: Signature, canonical: str) -> str:
    date, region, service, _ = signed.scope.split("/")
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{signed.amz_date}\n{signed.scope}\n{digest}"
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def check_signature(secrets: Secrets, signed: Signature, canonical: str) -> None:
    secret_key = secrets(signed.access_key)
    if secret_key is None:
        raise Refused("InvalidAccessKeyId", "The Access Key Id you provided does not exist.")
    if not hmac.compare_digest(expected_signature(secret_key, signed, canonical), signed.signature):
        raise Refused(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )


def header_signature(authorization: str, amz_date: str) -> Signature:
    """``AWS4-HMAC-SHA256 Credential=AK/SCOPE, SignedHeaders=a;b, Signature=HEX``."""
    algorithm, _, rest = authorization.partition(" ")
    fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
    if algorithm != ALGORITHM or not {"Credential", "SignedHeaders", "Signature"} <= set(fields):
        raise Refused("AccessDenied", "Access Denied. (only SigV4 is accepted)")
    return Signature.from_credential(
        fields["Credential"],
        amz_date=amz_date,
        signed_headers=tuple(fields["SignedHeaders"].split(";")),
        signature=fields["Signature"],
    )


def verify_header_auth(
    method: str, raw_path: str, query: str, headers: dict[str, str], body: bytes, secrets: Secrets
) -> str:
    """The access key of a request signed in its Authorization header (MinIO's admin calls)."""
    if "authorization" not in headers:
        raise Refused("AccessDenied", "Access Denied.")
    signed = header_signature(headers["authorization"], headers.get("x-amz-date", ""))
    payload_hash = headers.get("x-amz-content-sha256", "")
    if payload_hash != hashlib.sha256(body).hexdigest():
        raise Refused("XAmzContentSHA256Mismatch", "The body does not match its SHA-256.", 400)
    canonical = canonical_request(
        method, raw_path, query_pairs(query), headers, signed, payload_hash
    )
    check_signature(secrets, signed, canonical)
    return signed.access_key


def verify_presigned(
    method: str,
    raw_path: str,
    query: str,
    headers: dict[str, str],
    secrets: Secrets,
    now: datetime,
) -> Signature:
    """The signature of a presigned request, once its signature and expiry check out."""
    params = dict(query_pairs(query))
    if params.get("X-Amz-Algorithm") != ALGORITHM:
        raise Refused(BAD_QUERY, "X-Amz-Algorithm must be SigV4", 400)
    try:
        signed = Signature.from_credential(
            params["X-Amz-Credential"],
            amz_date=params["X-Amz-Date"],
            signed_headers=tuple(params["X-Amz-SignedHeaders"].split(";")),
            signature=params["X-Amz-Signature"],
        )
        issued = datetime.strptime(signed.amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        expires = int(params["X-Amz-Expires"])
    except (KeyError, ValueError) as exc:
        raise Refused(BAD_QUERY, f"bad presigned query: {exc}", 400) from exc
    if not 1 <= expires <= MAX_EXPIRES_S:
        raise Refused(BAD_QUERY, "X-Amz-Expires out of range", 400)
    if now > issued + timedelta(seconds=expires):
        raise Refused("AccessDenied", "Request has expired")
    unsigned = [(k, v) for k, v in query_pairs(query) if k != "X-Amz-Signature"]
    canonical = canonical_request(method, raw_path, unsigned, headers, signed, "UNSIGNED-PAYLOAD")
    check_signature(secrets, signed, canonical)
    return signed

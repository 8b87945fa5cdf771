"""A policed S3 stand-in for MinIO, for tests only (never a product).

No MinIO server can be obtained where refit is tested, and moto's S3 server checks no
credentials, so the per-component policies of deploy/containers/minio_init.py would never be
exercised. This process is moto's S3 (objects in memory) plus what MinIO adds that refit relies on:

- Every request is authenticated (SigV4) and authorized by its signer's policies from the first
  request on (moto's IAM enforcement, INITIAL_NO_AUTH_ACTION_COUNT=0). HEAD of a bucket needs
  s3:ListBucket, as in MinIO and AWS (moto would ask for an s3:HeadBucket no policy names).
- Anonymous requests are refused (403 AccessDenied), as by MinIO without a bucket policy.
- Presigned URLs (SigV4 in the query string; TorchServe fetches archives through them) are
  verified here, signature and expiry, because moto's IAM check reads only the Authorization
  header. A valid one goes on to moto signed in the header for the same identity, so the
  signer's policy decides, as in MinIO.
- The root identity (MINIO_ROOT_USER / MINIO_ROOT_PASSWORD) may do everything.
- The four MinIO admin calls minio_init.py makes (add-canned-policy, add-user, user-info,
  idp/builtin/policy/attach), root only, with MinIO's encrypted bodies: identities are created by
  the same code as in production. Users are moto IAM users named by their access key, each
  attached policy an inline policy of theirs.
- ``GET /minio/health/live`` answers 200 without authentication, as MinIO's liveness probe does.

Not MinIO: memory only; no bucket policies, groups, service accounts, policy conditions, or
other admin calls (501).

    MINIO_ROOT_USER=... MINIO_ROOT_PASSWORD=... python -m deploy.containers.test.s3_standin \
        --host 127.0.0.1 --port 9000
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
HEALTH_PATH = "/minio/health/live"
ADMIN_PREFIX = "/minio/admin/v3/"
ROOT_POLICY = "consoleAdmin"  # MinIO's built-in name for "everything"
EVERYTHING = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::*"]}],
}
BAD_QUERY = "AuthorizationQueryParametersError"  # a presigned query that is not SigV4
MAX_EXPIRES_S = 7 * 24 * 3600  # SigV4's limit for a presigned URL
PRESIGN_PARAMS = frozenset(
    {"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires"}
    | {"X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token"}
)

Secrets = Callable[[str], "str | None"]  # access key -> secret key, None when unknown
Start = Callable[[str, list[tuple[str, str]]], object]  # WSGI start_response


class Refused(Exception):
    """A request the stand-in answers itself with an S3 error (MinIO's code and message)."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


# --- SigV4 --------------------------------------------------------------------------------------


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


# --- identities: MinIO's users and canned policies, kept as moto IAM users ----------------------


class Identities:
    """Users (named by access key) with secrets, canned policies, and which user has which.
    moto checks each request against the user's inline IAM policies, which mirror this."""

    def __init__(self, iam) -> None:
        self._iam = iam
        self._keys: dict[str, Any] = {}  # access key -> moto's AccessKey (holds the secret)
        self._policies: dict[str, str] = {}  # name -> document (JSON)
        self._attached: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def secret(self, access_key: str) -> str | None:
        key = self._keys.get(access_key)
        return None if key is None else key.secret_access_key

    def add_policy(self, name: str, document: str) -> None:
        """Adds or replaces a policy; users that have it get the new document at once."""
        from moto.iam.exceptions import MalformedPolicyDocument
        from moto.iam.policy_validation import IAMPolicyDocumentValidator

        try:  # refused here, as by MinIO, rather than when a user gets it
            IAMPolicyDocumentValidator(document).validate()
        except (MalformedPolicyDocument, ValueError) as exc:
            raise Refused("MalformedPolicy", f"policy {name}: {exc}", 400) from exc
        with self._lock:
            self._policies[name] = document
            for user, names in self._attached.items():
                if name in names:
                    self._iam.put_user_policy(user, name, document)

    def add_user(self, access_key: str, secret_key: str) -> None:
        """A new user, or a new secret for one that exists (its policies stay)."""
        with self._lock:
            if access_key not in self._keys:
                self._iam.create_user(region_name="us-east-1", user_name=access_key, path="/")
                self._keys[access_key] = self._iam.create_access_key(access_key)
                self._keys[access_key].access_key_id = access_key  # MinIO: the name is the key
                self._attached[access_key] = []
            self._keys[access_key].secret_access_key = secret_key

    def attach(self, user: str, names: list[str]) -> None:
        with self._lock:
            if user not in self._attached:
                raise Refused(
                    "XMinioAdminNoSuchUser", f"The specified user {user} does not exist.", 404
                )
            if missing := [n for n in names if n not in self._policies]:
                raise Refused("XMinioAdminNoSuchPolicy", f"no policy {', '.join(missing)}", 404)
            new = [n for n in names if n not in self._attached[user]]
            if not new:
                raise Refused(
                    "XMinioAdminPolicyChangeAlreadyApplied",
                    "The specified policy change is already in effect.",
                    400,
                )
            for name in new:
                self._iam.put_user_policy(user, name, self._policies[name])
            self._attached[user] += new

    def policy_names(self, user: str) -> list[str]:
        with self._lock:
            if user not in self._attached:
                raise Refused(
                    "XMinioAdminNoSuchUser", f"The specified user {user} does not exist.", 404
                )
            return list(self._attached[user])


class Admin:
    """MinIO's admin API, the four calls minio_init.py makes; only the root identity may call."""

    def __init__(self, identities: Identities, root_user: str, root_password: str) -> None:
        self.identities = identities
        self.root_user, self.root_password = root_user, root_password

    def __call__(
        self, method: str, command: str, query: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        """The answer's status and body; raises Refused for an error."""
        try:
            return self._answer(method, command, query, body)
        except (KeyError, ValueError, OSError) as exc:  # a missing field, bad JSON, bad cipher
            raise Refused(
                "XMinioAdminInvalidArgument", f"malformed {command}: {exc!r}", 400
            ) from exc

    def _answer(
        self, method: str, command: str, query: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        if (method, command) == ("PUT", "add-canned-policy"):
            self.identities.add_policy(query["name"], body.decode())
            return 200, b""
        if (method, command) == ("PUT", "add-user"):
            user = json.loads(self._decrypt(body))
            self.identities.add_user(query["accessKey"], user["secretKey"])
            return 200, b""
        if (method, command) == ("GET", "user-info"):
            names = self.identities.policy_names(query["accessKey"])
            return 200, json.dumps({"policyName": ",".join(names), "status": "enabled"}).encode()
        if (method, command) == ("POST", "idp/builtin/policy/attach"):
            request = json.loads(self._decrypt(body))
            self.identities.attach(request["user"], request["policies"])
            return 204, b""  # no body: minio-py takes that as done (MinIO's older answer)
        raise Refused("NotImplemented", f"the S3 stand-in does not serve {method} {command}", 501)

    def _decrypt(self, body: bytes) -> bytes:
        """MinIO encrypts these bodies with the root password (minio.crypto's format)."""
        from minio.crypto import decrypt

        class Response(io.BytesIO):  # what minio.crypto reads from: a urllib3 response
            def release_conn(self) -> None:
                pass

        return decrypt(Response(body), self.root_password)


# --- the WSGI application -----------------------------------------------------------------------


class StandIn:
    """Health, the admin API and authentication here; everything else is moto's S3."""

    def __init__(self, s3, identities: Identities, admin: Admin) -> None:
        self.s3 = s3
        self.identities = identities
        self.admin = admin

    def __call__(self, environ: dict, start_response: Start) -> Iterable[bytes]:
        raw_path = (environ.get("RAW_URI") or environ.get("PATH_INFO", "/")).split("?", 1)[0]
        try:
            if raw_path == HEALTH_PATH:
                return _reply(start_response, 200, b"", "text/plain")
            if raw_path.startswith(ADMIN_PREFIX):
                return self._admin(environ, raw_path, start_response)
            if "X-Amz-Signature" in dict(query_pairs(environ.get("QUERY_STRING", ""))):
                self._accept_presigned(environ, raw_path)
            elif not environ.get("HTTP_AUTHORIZATION", "").startswith(ALGORITHM + " "):
                raise Refused("AccessDenied", "Access Denied.")
        except Refused as refused:
            body = _s3_error(refused, raw_path)
            return _reply(start_response, refused.status, body, "application/xml")
        return self.s3(environ, start_response)

    def _admin(self, environ: dict, raw_path: str, start_response: Start) -> Iterable[bytes]:
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        query = environ.get("QUERY_STRING", "")
        try:
            signer = verify_header_auth(
                environ["REQUEST_METHOD"], raw_path, query, _headers(environ), body,
                self.identities.secret,
            )  # fmt: skip
            if signer != self.admin.root_user:
                raise Refused("AccessDenied", "Access Denied. (admin calls are the root's)")
            command = raw_path.removeprefix(ADMIN_PREFIX)
            status, answer = self.admin(
                environ["REQUEST_METHOD"], command, dict(query_pairs(query)), body
            )
        except Refused as refused:
            error = {"Code": refused.code, "Message": refused.message, "Resource": raw_path}
            answer = json.dumps(error).encode()
            return _reply(start_response, refused.status, answer, "application/json")
        return _reply(start_response, status, answer, "application/json")

    def _accept_presigned(self, environ: dict, raw_path: str) -> None:
        """Verifies the URL, then rewrites the request as the same identity's header-signed one
        (query auth removed), for moto to authorize."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        method, raw_query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
        signed = verify_presigned(
            method, raw_path, raw_query, _headers(environ), self.identities.secret,
            datetime.now(UTC),
        )  # fmt: skip
        kept = [
            p
            for p in raw_query.split("&")
            if p and unquote(p.partition("=")[0]) not in PRESIGN_PARAMS
        ]
        query = "&".join(kept)
        target = raw_path + (f"?{query}" if query else "")
        environ.update(QUERY_STRING=query, RAW_URI=target, REQUEST_URI=target)
        host = environ.get("HTTP_HOST", "")
        request = AWSRequest(method=method, url=f"http://{host}{target}", headers={"Host": host})
        credentials = Credentials(signed.access_key, self.identities.secret(signed.access_key))
        S3SigV4Auth(credentials, "s3", signed.region).add_auth(request)
        environ["HTTP_AUTHORIZATION"] = request.headers["Authorization"]
        environ["HTTP_X_AMZ_DATE"] = request.headers["X-Amz-Date"]
        environ["HTTP_X_AMZ_CONTENT_SHA256"] = request.headers["X-Amz-Content-SHA256"]


def _headers(environ: dict) -> dict[str, str]:
    """The request's headers, lower-case names (WSGI keeps two of them outside HTTP_*)."""
    headers = {
        key[5:].replace("_", "-").lower(): value
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    return headers


def _s3_error(refused: Refused, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{refused.code}</Code><Message>{refused.message}</Message>"
        f"<Resource>{resource}</Resource><RequestId></RequestId></Error>"
    ).encode()


def _reply(start_response: Start, status: int, body: bytes, content_type: str) -> list[bytes]:
    reason = HTTPStatus(status).phrase
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    start_response(f"{status} {reason}", headers)
    return [body]


def build_app(root_user: str, root_password: str) -> StandIn:
    """moto's S3 with IAM enforced from the first request, the root identity, the admin API."""
    from moto import settings
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends
    from moto.moto_server.werkzeug_app import create_backend_app
    from moto.s3 import responses

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # this process only: it is the stand-in's
    responses.ACTION_MAP["BUCKET"]["HEAD"]["DEFAULT"] = "ListBucket"  # MinIO's (and AWS's) rule
    identities = Identities(iam_backends[DEFAULT_ACCOUNT_ID]["aws"])
    identities.add_policy(ROOT_POLICY, json.dumps(EVERYTHING))
    identities.add_user(root_user, root_password)
    identities.attach(root_user, [ROOT_POLICY])
    return StandIn(
        create_backend_app("s3"), identities, Admin(identities, root_user, root_password)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args(argv)
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    app = build_app(os.environ["MINIO_ROOT_USER"], os.environ["MINIO_ROOT_PASSWORD"])
    server = make_server(
        args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler
    )
    print(f"policed S3 stand-in on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

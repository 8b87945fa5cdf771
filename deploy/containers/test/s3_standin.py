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

The SigV4 checks are in sigv4.py, the identities and admin calls in minio_admin.py; this module
is the WSGI application that routes to them and to moto, and its entry point.

Not MinIO: memory only; no bucket policies, groups, service accounts, policy conditions, or
other admin calls (501).

    MINIO_ROOT_USER=... MINIO_ROOT_PASSWORD=... python -m deploy.containers.test.s3_standin \
        --host 127.0.0.1 --port 9000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from http import HTTPStatus
from urllib.parse import unquote

from deploy.containers.test.minio_admin import Admin, Identities
from deploy.containers.test.sigv4 import (
    ALGORITHM,
    PRESIGN_PARAMS,
    Refused,
    query_pairs,
    verify_header_auth,
    verify_presigned,
)

HEALTH_PATH = "/minio/health/live"
ADMIN_PREFIX = "/minio/admin/v3/"
ROOT_POLICY = "consoleAdmin"  # MinIO's built-in name for "everything"
EVERYTHING = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::*"]}],
}
Start = Callable[[str, list[tuple[str, str]]], object]  # WSGI start_response


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

"""The S3 stand-in's own signature checks (deploy/containers/test/sigv4.py), as pure logic:
URLs and headers signed by minio-py's signer (the client refit uses), verified with a clock the
test sets. The stand-in as a server is exercised by test_policies.py and every S3 test."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from minio.credentials import Credentials
from minio.signer import presign_v4, sign_v4_s3

from deploy.containers.test.sigv4 import Refused, verify_header_auth, verify_presigned

HOST = "127.0.0.1:9000"
KEYS = {"refit-service": "service-secret"}
ISSUED = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
SIGNER = Credentials("refit-service", "service-secret")


def presigned(path: str = "/refit/archives/m/a%20b.mar", expires_s: int = 900) -> str:
    """A presigned GET as S3Store.url makes it (the key has a space, percent-encoded)."""
    url = urlsplit(f"http://{HOST}{path}")
    return presign_v4(
        method="GET", url=url, region="us-east-1", credentials=SIGNER, date=ISSUED,
        expires=expires_s,
    ).geturl()  # fmt: skip


def verify(url: str, now: datetime = ISSUED, host: str = HOST):
    parts = urlsplit(url)
    return verify_presigned("GET", parts.path, parts.query, {"host": host}, KEYS.get, now)


def test_a_presigned_url_verifies_until_it_expires() -> None:
    signed = verify(presigned(), now=ISSUED + timedelta(seconds=900))
    assert (signed.access_key, signed.region) == ("refit-service", "us-east-1")
    with pytest.raises(Refused) as caught:
        verify(presigned(), now=ISSUED + timedelta(seconds=901))
    assert (caught.value.code, caught.value.message) == ("AccessDenied", "Request has expired")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda url: url.replace("archives/m/a%20b.mar", "archives/m/other.mar"),
        lambda url: url[:-1] + ("0" if url[-1] != "0" else "1"),  # the signature
        lambda url: url.replace("X-Amz-Expires=900", "X-Amz-Expires=9000"),
    ],
    ids=["another key", "the signature", "a longer expiry"],
)
def test_a_tampered_url_is_refused(tamper) -> None:
    with pytest.raises(Refused) as caught:
        verify(tamper(presigned()))
    assert caught.value.code == "SignatureDoesNotMatch"


def test_the_host_is_signed() -> None:
    with pytest.raises(Refused) as caught:
        verify(presigned(), host="elsewhere:9000")
    assert caught.value.code == "SignatureDoesNotMatch"


def test_an_unknown_signer_and_an_expiry_over_a_week_are_refused() -> None:
    with pytest.raises(Refused) as caught:
        verify(presigned().replace("refit-service", "nobody"))
    assert caught.value.code == "InvalidAccessKeyId"
    with pytest.raises(Refused) as caught:
        verify(presigned(expires_s=8 * 24 * 3600))
    assert caught.value.status == 400


def admin_call(body: bytes) -> tuple[str, str, dict[str, str]]:
    """A header-signed admin call as minio-py's MinioAdmin makes it: (path, query, headers)."""
    url = urlsplit(f"http://{HOST}/minio/admin/v3/add-user?accessKey=refit-service")
    digest = hashlib.sha256(body).hexdigest()
    headers = {"Host": HOST, "x-amz-date": "20261207T120000Z", "x-amz-content-sha256": digest}
    headers = sign_v4_s3(
        method="PUT", url=url, region="", headers=headers, credentials=SIGNER,
        content_sha256=digest, date=ISSUED,
    )  # fmt: skip
    return url.path, url.query, {k.lower(): v for k, v in headers.items()}


def test_a_header_signed_call_verifies_and_its_body_is_checked() -> None:
    path, query, headers = admin_call(b"payload")
    assert verify_header_auth("PUT", path, query, headers, b"payload", KEYS.get) == "refit-service"
    with pytest.raises(Refused) as caught:
        verify_header_auth("PUT", path, query, headers, b"tampered", KEYS.get)
    assert caught.value.code == "XAmzContentSHA256Mismatch"
    with pytest.raises(Refused) as caught:
        verify_header_auth("PUT", path, "accessKey=root", headers, b"payload", KEYS.get)
    assert caught.value.code == "SignatureDoesNotMatch"

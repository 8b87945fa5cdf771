"""The one set of rules for identifiers that come from outside: model names, versions, job ids,
buckets and object keys or prefixes.

Every boundary (the service's RPCs, the trainer's submit, the registry and both object stores)
checks with these functions, so a name that passes one check passes them all, and none of them
can climb out of its place in the store (``..``, absolute paths, empty segments). A failed check
is INVALID_ARGUMENT with the rule in the message.
"""

from __future__ import annotations

import re

from refit.errors import InvalidArgument

MODEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,31}")  # no dots: never a path segment
JOB_ID = re.compile(r"job-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}")  # trainer.jobs.records.new_job_id
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's rules, below the extra ones
IPV4 = re.compile(r"[0-9]+(\.[0-9]+){3}")
MAX_KEY_BYTES = 1024  # S3's limit


class InvalidIdentifier(InvalidArgument):
    pass


class InvalidModelName(InvalidIdentifier):
    pass


def check_model_name(name: str) -> str:
    if not MODEL.fullmatch(name):
        raise InvalidModelName(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def check_version(version: str, what: str = "version") -> str:
    if not VERSION.fullmatch(version):
        raise InvalidIdentifier(
            f"invalid {what} {version!r}: use 1-32 letters, digits, '-' or '_' (e.g. '3')"
        )
    return version


def check_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise InvalidIdentifier(
            f"invalid job id {job_id!r}: job ids look like job-20260101T120000-1a2b3c4d "
            "(`refit jobs` lists them)"
        )
    return job_id


def check_bucket(bucket: str) -> str:
    if not BUCKET.fullmatch(bucket) or ".." in bucket or IPV4.fullmatch(bucket):
        raise InvalidIdentifier(
            f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    return bucket


def check_key(key: str, what: str = "object key") -> str:
    """An object key: relative, '/'-separated, no empty, '.' or '..' segments, no control
    characters, at most 1024 bytes."""
    if not key:
        raise InvalidIdentifier(f"invalid {what}: empty")
    _check_segments(key, key.split("/"), what)
    return key


def check_prefix(prefix: str, what: str = "prefix") -> str:
    """A listing prefix: empty (everything), or a key that may end with '/'."""
    if prefix:
        _check_segments(prefix, prefix.removesuffix("/").split("/"), what)
    return prefix


def _check_segments(text: str, segments: list[str], what: str) -> None:
    if len(text.encode()) > MAX_KEY_BYTES:
        raise InvalidIdentifier(f"invalid {what}: longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 0x20 or c in "\x7f\\" for c in text):
        raise InvalidIdentifier(f"invalid {what} {text!r}: control characters or '\\'")
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidIdentifier(
            f"invalid {what} {text!r}: no leading '/', empty, '.' or '..' segments"
        )

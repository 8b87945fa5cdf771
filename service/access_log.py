"""The access log: every call that did not end OK at WARNING (OK ones at DEBUG), under its
request id (the ``x-request-id`` header, else the request's ``request_id``, else a new one)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc

from refit import logs

log = logging.getLogger("refit.access")
REQUEST_ID_HEADER = "x-request-id"


def request_id(header_id: str, request: Any) -> str:
    return header_id or getattr(request, "request_id", "") or uuid.uuid4().hex[:16]


def log_call(method: str, rid: str, code: grpc.StatusCode, seconds: float) -> None:
    level = logging.DEBUG if code == grpc.StatusCode.OK else logging.WARNING
    if log.isEnabledFor(level):  # most calls end OK: no id is made for a line not written
        with logs.bound(logs.request_id, rid or request_id("", None)):
            log.log(level, "%s %s %.1fms", method, code.name, 1000 * seconds)

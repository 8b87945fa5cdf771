"""Logging for every refit process: plain text or JSON lines, carrying request and job ids.

``REFIT_LOG_FORMAT=json`` makes each record one JSON object, so a retrain can be followed across
the service, the trainer and TorchServe logs by its ``job_id``, and a prediction by ``request_id``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from refit.settings import declare, parse_choice

LOG_FORMAT = declare(
    "REFIT_LOG_FORMAT",
    "text",
    "text, or json: one JSON object per record, with its request_id and job_id",
    parse=parse_choice("text", "json"),
)
LOG_LEVEL = declare("REFIT_LOG_LEVEL", "INFO", "lowest level logged: DEBUG, INFO, WARNING, ERROR")

# Ids of the work this thread is doing now; set by the service interceptor or the job runner.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
job_id: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")


class _ContextIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.job_id = job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            if value := getattr(record, key, ""):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(
            f"{key}={value}"
            for key in ("request_id", "job_id")
            if (value := getattr(record, key, ""))
        )
        line = super().format(record)
        return f"{line} [{ids}]" if ids else line


def configure(component: str, fmt: str | None = None, level: str | None = None) -> None:
    """Call once from a process's ``main``: never at import time."""
    fmt = fmt or LOG_FORMAT.value(os.environ)
    handler = logging.StreamHandler()
    handler.addFilter(_ContextIds())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter(f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or LOG_LEVEL.value(os.environ))


@contextmanager
def bound(var: contextvars.ContextVar[str], value: str) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)

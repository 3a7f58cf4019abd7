"""Structured logs: JSON lines when the log stream is not a terminal, readable text when it is.

``setup_logging()`` configures the root logger once for ``ncservice serve|api|worker|reconciler``. Each JSON
line has ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, the exception (``exc``) if any, and every
context field set on the record: ``job_id``, ``sweep_id``, ``epoch``, ``total``, ``webhook_id``, ... given as
``log.info(..., extra={"job_id": ...})`` or bound for a block of code with :func:`log_context` (the worker
binds the job id around a whole task, so every line logged while it runs names the job, ncengine's too).

The format is chosen by ``fmt``: ``"json"``, ``"text"`` or ``"auto"`` (JSON unless the stream is a TTY);
the service passes ``Settings.log_format`` (env ``NCS_LOG_FORMAT``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Any

_CONTEXT: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("ncs_log_context", default={})

#: attributes every LogRecord has; anything else on a record is a context field (``extra=``)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (e.g. ``job_id=...``) to every record logged in this block (this thread / task)."""
    token = _CONTEXT.set({**_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


class ContextFilter(logging.Filter):
    """Copies the :func:`log_context` fields onto each record (fields given by ``extra=`` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def context_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The non-standard attributes of ``record`` (its context fields)."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts, level, logger, msg``, context fields, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        out.update(context_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message [key=value ...]`` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = context_fields(record)
        if fields:
            head, sep, tail = text.partition("\n")
            text = head + " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]" + sep + tail
        return text


def make_handler(stream: IO[str] | None = None, fmt: str = "auto") -> logging.Handler:
    """A stream handler with the JSON or text formatter (``fmt``: ``auto`` = JSON unless ``stream`` is a TTY)."""
    stream = stream if stream is not None else sys.stderr
    if fmt not in ("auto", "json", "text"):
        raise ValueError(f"log format: {fmt!r}, expected auto, json or text")
    use_json = fmt == "json" or (fmt == "auto" and not (hasattr(stream, "isatty") and stream.isatty()))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(ContextFilter())
    return handler


def setup_logging(level: str = "INFO", *, fmt: str = "auto", stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger: one handler (replacing earlier ones) at ``level``. Returns the handler."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = make_handler(stream, fmt)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler

"""Structured logs (ncservice.logs): JSON lines off a TTY, text on one, context fields (job ids)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from ncservice.logs import log_context, make_handler


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logger():
    log = logging.getLogger("ncs-test-logs")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    log.handlers.clear()


def _lines(stream) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_when_not_a_tty(logger):
    stream = io.StringIO()
    logger.addHandler(make_handler(stream))
    logger.info("job %s epoch %d", "abc", 3, extra={"job_id": "abc", "epoch": 3})
    with log_context(job_id="j1", sweep_id="s1"):
        logger.warning("inside")
        try:
            1 / 0
        except ZeroDivisionError:
            logger.exception("boom", extra={"job_id": "override"})
    logger.info("outside")
    first, inside, boom, outside = _lines(stream)
    assert first["msg"] == "job abc epoch 3" and first["job_id"] == "abc" and first["epoch"] == 3
    assert first["level"] == "INFO" and first["logger"] == "ncs-test-logs" and first["ts"].endswith("+00:00")
    assert inside["job_id"] == "j1" and inside["sweep_id"] == "s1" and inside["level"] == "WARNING"
    assert boom["job_id"] == "override" and "ZeroDivisionError" in boom["exc"]
    assert "job_id" not in outside  # the context ended with the block


def test_text_on_a_tty_and_forced_formats(logger):
    tty = Tty()
    logger.addHandler(make_handler(tty))
    logger.info("hello %s", "you", extra={"job_id": "j9"})
    line = tty.getvalue().strip()
    assert line.endswith("INFO ncs-test-logs: hello you [job_id=j9]")
    logger.handlers.clear()
    forced = Tty()
    logger.addHandler(make_handler(forced, "json"))
    logger.info("x")
    assert _lines(forced)[0]["msg"] == "x"
    with pytest.raises(ValueError):
        make_handler(io.StringIO(), "xml")

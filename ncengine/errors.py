"""Errors raised by ncengine. One root, a shallow tree beneath it."""

from __future__ import annotations


class NCEngineError(Exception):
    """Root of every error ncengine raises on purpose."""


class InputError(NCEngineError, ValueError):
    """Bad input. ``field`` names the input at fault, ``expected`` says what was expected.

    The API maps it to HTTP 422 problem+json with ``field`` in the body.
    """

    def __init__(self, field: str, message: str, *, expected: str | None = None) -> None:
        self.field = field
        self.message = message
        self.expected = expected
        super().__init__(f"{field}: {message}" + (f" (expected {expected})" if expected else ""))


class BoundViolation(NCEngineError):
    """A theorem the code relies on (e.g. ``loss >= m``, Theorem 2.3.1) failed at run time."""

"""Webhook signatures (HMAC-SHA256, RFC 2104): shared by the API (which tells a key its secret), the worker
(which signs) and receivers (which verify; :func:`verify` is for them).

A webhook is a ``POST`` of a JSON body with the headers:

- ``X-NCS-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>`` (GitHub's convention);
- ``X-NCS-Event: job.finished | sweep.finished`` and ``X-NCS-Delivery: <webhook id>`` (the same on every retry,
  so a receiver can drop duplicates).

The body holds ``sent_at`` (ISO time of this attempt), so a receiver may also refuse stale replays.

Secrets: with auth off (no API key: owner ``None``) the server secret itself; for the API key ``key_id``,
``HMAC-SHA256(server secret, "ncs-webhook:" + key_id)`` in hex, which ``GET /webhooks/secret`` answers to that
key's owner. Nothing is stored per key, and changing the server secret rotates every key's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from ncservice.settings import Settings

SIGNATURE_HEADER = "X-NCS-Signature-256"
EVENT_HEADER = "X-NCS-Event"
DELIVERY_HEADER = "X-NCS-Delivery"


def server_secret(settings: Settings) -> str:
    """``settings.webhook_secret``, else a random 256-bit secret kept in ``<data_dir>/webhook.secret`` (created
    on first use, mode 0600; concurrent first uses agree because the file is created exclusively)."""
    if settings.webhook_secret:
        return settings.webhook_secret
    path = Path(settings.data_dir) / "webhook.secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    value = path.read_text().strip()
    if not value:
        raise RuntimeError(f"{path} is empty: delete it or set NCS_WEBHOOK_SECRET")
    return value


def secret_for(settings: Settings, owner: str | None) -> str:
    """The signing secret of the webhooks of ``owner`` (an API key id, or ``None`` when auth is off)."""
    root = server_secret(settings)
    if owner is None:
        return root
    return hmac.new(root.encode(), f"ncs-webhook:{owner}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes) -> str:
    """The ``X-NCS-Signature-256`` header value of ``body``: ``sha256=<hex digest>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Receiver side: does ``header`` (``X-NCS-Signature-256``) sign the raw ``body`` with ``secret``?
    Constant-time comparison."""
    return bool(header) and hmac.compare_digest(sign(secret, body), header.strip())

"""API keys (issue 7): create, list, revoke, authenticate.

A token is ``ncs_`` + 43 url-safe characters from :func:`secrets.token_urlsafe` (256 bits of entropy); only its
sha256 is stored (a fast hash is enough for a high-entropy secret: there is nothing to brute-force), and it is
compared with :func:`hmac.compare_digest`. The key's ``id`` is the owner id of what the key creates. Functions
take a Session and commit themselves, like ``db.jobs``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.errors import NotFound
from db.models import ApiKey, utcnow

TOKEN_PREFIX = "ncs_"
#: ``last_used_at`` is written at most this often per key (polling must not turn every GET into a write)
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_token(token: str) -> str:
    """Hex sha256 of a token (what the ``api_keys.token_hash`` column holds)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_key(session: Session, *, name: str, admin: bool = False) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the token, which is never stored and cannot be shown again."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, token_hash=hash_token(token), prefix=token[:10], admin=admin)
    session.add(key)
    session.commit()
    return key, token


def list_keys(session: Session, *, include_revoked: bool = True) -> list[ApiKey]:
    """Every key, oldest first."""
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        stmt = stmt.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(stmt))


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key (idempotent: a revoked key keeps its first ``revoked_at``).

    Raises:
        NotFound: no key has this id.
    """
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound("api_key", key_id)
    if key.revoked_at is None:
        session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                        .values(revoked_at=utcnow()))
        session.commit()
        session.refresh(key)
    return key


def has_active_keys(session: Session) -> bool:
    """Whether at least one key is not revoked. Commits: the API asks this in one dependency and queries jobs in
    another threadpool hop, and a connection held across hops can starve the pool (every thread waiting for a
    connection that a request queued behind them holds)."""
    found = session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None
    session.commit()
    return found


def authenticate(session: Session, token: str) -> ApiKey | None:
    """The active key whose token is ``token``, or None (unknown, malformed or revoked)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token)
    key = session.scalar(select(ApiKey).where(ApiKey.token_hash == digest))  # unique index on token_hash
    # end the read transaction: a read-only session (GET requests) must not upgrade a read snapshot to a write
    session.commit()
    # the lookup is by digest; compare_digest keeps the final check constant-time all the same
    if key is None or key.revoked_at is not None or not hmac.compare_digest(key.token_hash, digest):
        return None
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
        session.commit()
    return key

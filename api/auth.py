"""Authentication by API key (issue 7): ``Authorization: Bearer <key>``, keys made by ``ncservice keys``.

Modes (``Settings.auth``, ``NCS_AUTH``):

* ``on``: every resource request needs an active key (401 problem+json otherwise).
* ``off``: nobody needs a key and every caller is the admin principal. Allowed only when the API listens on a
  loopback address (``Settings.host``); anywhere else the API refuses to start.
* ``auto`` (default): on a loopback address, keys are required as soon as one active key exists (a laptop with
  no keys just works); on any other address it is ``on``, and the API refuses to start while no active key
  exists, saying why.

Every sweep, job and upload is written with ``owner = key id``; another key gets 404 for it (``db.jobs``
scopes every read by owner); an ``admin`` key is the principal ``owner=None`` and sees every row. A token that
is sent is always checked, in every mode but ``off``: a wrong key is a 401, never silently anonymous.
``/health``, ``/ready``, ``/metrics`` and the OpenAPI documents stay public.

A browser cannot send a Bearer header, so the dashboard has a login page (``/ui/login``, see
``api.routers.dashboard``) that checks a key like the Bearer path and keeps it in an HttpOnly,
``SameSite=Strict`` cookie (:data:`SESSION_COOKIE`). That cookie is a credential only for ``GET`` and ``HEAD``
requests (the dashboard's pages and the figures they embed): every request that changes something needs the
Bearer header, so a cross-site form or script cannot make the cookie do anything, even where a browser would
send it. A Bearer header, when present, wins over the cookie; an unknown or revoked key in the cookie is a 401
like a wrong Bearer key (the dashboard's pages turn it into a redirect to the login page).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials

from api.problems import ApiProblem

#: the dashboard's login cookie (holds the API key; see the module docstring)
SESSION_COOKIE = "ncs_key"
#: the methods for which :data:`SESSION_COOKIE` is a credential: read-only ones
COOKIE_METHODS = frozenset({"GET", "HEAD"})

#: how long "does any active key exist?" is cached per app in ``auto`` mode on loopback (seconds)
KEYS_EXIST_TTL = 2.0


class AuthConfigError(RuntimeError):
    """The API must not start with this auth configuration (the message says why and what to do)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address) is a loopback address: ``127.0.0.0/8``, ``::1`` or ``localhost``.

    ``0.0.0.0`` and ``::`` listen on every interface, so they are not loopback.
    """
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_startup(settings: Any, sessionmaker: Any) -> None:
    """Refuse to start an API that would be open beyond this machine.

    Args:
        settings: the service settings (``host``, ``auth``).
        sessionmaker: sessions on the (migrated) database, to look for active keys.

    Raises:
        AuthConfigError: ``auth=off`` on a non-loopback host, or ``auth`` ``on``/``auto`` on a non-loopback host
            with no active API key.
    """
    from db.keys import has_active_keys

    if is_loopback(settings.host):
        return
    if settings.auth == "off":
        raise AuthConfigError(
            f"refusing to start: NCS_AUTH=off is only allowed on a loopback address, but the API would listen on "
            f"{settings.host!r}. Listen on 127.0.0.1, or set NCS_AUTH=auto and create a key with "
            f"`ncservice keys create --admin NAME`.")
    with sessionmaker() as session:
        active = has_active_keys(session)
    if not active:
        raise AuthConfigError(
            f"refusing to start: the API would listen on {settings.host!r} (not loopback) and no API key exists, "
            f"so anyone who can reach it could use it. Create one with `ncservice keys create --admin NAME` "
            f"(clients send 'Authorization: Bearer <key>'), or listen on 127.0.0.1.")


@dataclass(frozen=True)
class Principal:
    """Who is calling: ``key_id`` None for the anonymous admin (auth not required); ``cookie`` when the key
    came from the dashboard's login cookie rather than a Bearer header."""

    key_id: str | None
    admin: bool
    cookie: bool = False

    @property
    def owner(self) -> str | None:
        """The owner id that scopes rows: the key id, or None (sees all) for an admin."""
        return None if self.admin else self.key_id


ANONYMOUS_ADMIN = Principal(key_id=None, admin=True)


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, "unauthorized", detail, field="Authorization",
                      headers={"WWW-Authenticate": 'Bearer realm="ncs"'})


def cookie_token(request: Request) -> str | None:
    """The key in the login cookie for a ``GET``/``HEAD`` request (:data:`COOKIE_METHODS`); else None."""
    if request.method not in COOKIE_METHODS:
        return None
    return request.cookies.get(SESSION_COOKIE) or None


def key_principal(session: Any, token: str, *, cookie: bool = False) -> Principal | None:
    """The principal of the active key ``token`` (``db.keys.authenticate``), or None (unknown, malformed or
    revoked).

    The one key check of the API: the Bearer header, the login cookie and the login form all go through it.
    """
    from db.keys import authenticate

    key = authenticate(session, token)
    return None if key is None else Principal(key_id=key.id, admin=key.admin, cookie=cookie)


def _keys_exist(request: Request, session: Any) -> bool:
    from db.keys import has_active_keys

    state = request.app.state
    cached = getattr(state, "auth_keys_exist", None)
    now = time.monotonic()
    if cached is None or now - cached[1] > KEYS_EXIST_TTL:
        cached = (has_active_keys(session), now)
        state.auth_keys_exist = cached
    return cached[0]


def needs_database(request: Request, settings: Any, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """Whether :func:`principal` would query the database for this request (a key to look up, or the cached
    "does any active key exist?" answer expired); when not, it is resolved on the event loop, no thread hop."""
    if settings.auth == "off" and is_loopback(settings.host):
        return False
    if credentials is not None:
        return True
    if request.headers.get("authorization"):
        return False
    if cookie_token(request) is not None:
        return True
    if settings.auth == "on" or not is_loopback(settings.host):
        return False
    cached = getattr(request.app.state, "auth_keys_exist", None)
    return cached is None or time.monotonic() - cached[1] > KEYS_EXIST_TTL


def auth_required(request: Request, settings: Any, session: Any) -> bool:
    """Whether this request must carry a key (see the module docstring for the modes)."""
    if settings.auth == "on" or not is_loopback(settings.host):
        return True
    if settings.auth == "off":
        return False
    return _keys_exist(request, session)


def principal(request: Request, settings: Any, session: Any,
              credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """Resolve the caller: from the Bearer header when one is sent, else (``GET``/``HEAD`` only) from the
    dashboard's login cookie, else anonymous where no key is required.

    Raises:
        ApiProblem: 401 (with ``WWW-Authenticate: Bearer``) for a missing key where one is required, and for a
            key that is sent (header or cookie) but unknown, malformed or revoked.
    """
    if settings.auth == "off" and is_loopback(settings.host):
        return ANONYMOUS_ADMIN
    if credentials is None:
        if request.headers.get("authorization"):
            raise _unauthorized("the Authorization header must be 'Bearer <api key>'")
        token = cookie_token(request)
        if token is not None:
            who = key_principal(session, token, cookie=True)
            if who is None:
                raise _unauthorized("the API key of the login cookie is unknown or revoked: log in again")
            return who
        if auth_required(request, settings, session):
            raise _unauthorized("an API key is required: send 'Authorization: Bearer <api key>'")
        return ANONYMOUS_ADMIN
    who = key_principal(session, credentials.credentials)
    if who is None:
        raise _unauthorized("unknown or revoked API key")
    return who

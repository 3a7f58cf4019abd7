"""``HEAD`` for every ``GET`` route (RFC 9110 §9.3.2: the same headers as ``GET``, no body).

FastAPI routes a ``GET`` route for ``GET`` only (``HEAD`` answers 405). This middleware hands a ``HEAD`` request
to the app as a ``GET`` and drops the body it sends back, keeping the status and every header
(``Content-Length``, ``ETag``, ``Retry-After``): uptime checks and ``curl -I`` see what a ``GET`` would get.
A streaming body (``/jobs/{id}/events``) ends after its headers.
"""

from __future__ import annotations

from typing import Any


class HeadAsGet:
    """ASGI middleware: ``HEAD`` -> ``GET`` with the response body dropped."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        done = False

        async def disconnect_after_headers() -> dict:
            if done:  # a streaming route waits for the client: it has what it asked for
                return {"type": "http.disconnect"}
            return await receive()

        async def send_headers_only(message: dict) -> None:
            nonlocal done
            if message["type"] == "http.response.start":
                await send(message)
                return
            if message["type"] == "http.response.body" and not done:
                done = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, disconnect_after_headers, send_headers_only)

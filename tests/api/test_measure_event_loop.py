"""A large JSON ``POST /measure`` must not hold up the event loop: its body is parsed, validated and converted
in a worker thread, so other requests (``GET /health``) keep being answered meanwhile.

Through a real uvicorn server (in a thread of this process, on a loopback port): the JSON parse of a few-MB body
is held, after parsing, until ``GET /health`` has answered. If the parse ran on the event loop, the hold would
block the loop, ``/health`` could not answer and the measure would finish first. No timing threshold.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import numpy as np
import pytest
import uvicorn

from api.app import create_app
from api.deps import get_queue
from api.routers import measure as measure_router
from ncservice.settings import Settings
from tests.api.conftest import RecordingQueue

HOLD_S = 20.0  # the longest the parse waits for /health (only reached when the event loop is blocked)


@pytest.fixture
def server(api_db_url, tmp_path):
    """``http://127.0.0.1:<port>`` of a uvicorn server running the app; stopped afterwards."""
    cfg = Settings(_env_file=None, data_dir=tmp_path / "data", database_url=api_db_url,
                   measure_sync_max_elements=10_000_000, max_upload_bytes=2_000_000, max_json_bytes=32_000_000)
    app = create_app(cfg)
    app.dependency_overrides[get_queue] = RecordingQueue
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    ready = threading.Event()
    for _ in range(200):
        if srv.started:
            ready.set()
            break
        thread.join(0.05)
    assert ready.is_set(), "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", thread
    srv.should_exit = True
    thread.join(15)
    sock.close()
    app.state.engine.dispose()


def test_health_answers_while_a_large_json_measure_is_parsed(server, monkeypatch):
    base, server_thread = server
    real_parse = measure_router._parse_json
    parsing, health_answered, measure_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict = {}

    def held_parse(raw: bytes):
        seen["thread"] = threading.current_thread()
        parsing.set()
        out = real_parse(raw)
        seen["released"] = health_answered.wait(HOLD_S)
        return out

    monkeypatch.setattr(measure_router, "_parse_json", held_parse)

    rng = np.random.default_rng(0)
    n, d, C = 20_000, 10, 4  # ~4 MB of JSON
    y = np.arange(n) % C
    H = rng.normal(size=(n, d)) + 4 * np.eye(C, d)[y]
    body = json.dumps({"features": H.tolist(), "labels": y.tolist(), "remap_labels": False}).encode()
    assert 2_000_000 < len(body) < 32_000_000
    result: dict = {}

    def post() -> None:
        try:
            with httpx.Client(timeout=120) as c:
                result["resp"] = c.post(f"{base}/measure", content=body,
                                        headers={"content-type": "application/json"})
        finally:
            measure_done.set()

    poster = threading.Thread(target=post, name="measure-client")
    poster.start()
    try:
        assert parsing.wait(60), "the JSON body never reached the parse step"
        with httpx.Client(timeout=HOLD_S + 10) as c:
            health = c.get(f"{base}/health")
        measure_was_done = measure_done.is_set()
        health_answered.set()
        assert health.status_code == 200, health.text
        assert not measure_was_done, "GET /health answered only after the measure finished"
    finally:
        health_answered.set()
        poster.join(120)
    assert seen["released"], "the parse was never released by /health: the event loop was blocked"
    assert seen["thread"] is not server_thread  # the event loop runs in the server thread
    resp = result["resp"]
    assert resp.status_code == 200, resp.text
    assert resp.json()["num_samples"] == n and resp.json()["num_classes"] == C


def test_json_measure_parses_in_the_threadpool(client, monkeypatch):
    """In-process (TestClient) variant: the parse + validation run off the event loop's thread."""
    import asyncio

    real_parse = measure_router._parse_json
    seen: dict = {}

    def spy(raw: bytes):
        try:
            asyncio.get_running_loop()
            seen["on_loop"] = True
        except RuntimeError:
            seen["on_loop"] = False
        return real_parse(raw)

    monkeypatch.setattr(measure_router, "_parse_json", spy)
    r = client.post("/measure", json={"features": [[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]],
                                      "labels": [0, 0, 1, 1]})
    assert r.status_code == 200, r.text
    assert seen == {"on_loop": False}


@pytest.mark.parametrize("content, status, field", [
    (b'{"features": [[1.0, 2.0]], "labels": [0]', 400, "body"),  # not JSON
    (b'{"features": [[1.0, "x"]], "labels": [0, 1]}', 422, "features.0.1"),
    (b'{"features": [[1.0, 2.0], [2.0, 1.0]], "labels": [0, 1], "center": "middle"}', 422, "center"),
])
def test_errors_survive_the_move_off_the_event_loop(client, content, status, field):
    from tests.api.conftest import assert_problem

    assert_problem(client.post("/measure", content=content, headers={"content-type": "application/json"}),
                   status, field)


def test_json_over_the_limit_is_413(client, settings):
    big = b'{"features": [' + b"[1.0, 2.0]," * (settings.max_json_bytes // 10) + b'[1.0, 2.0]], "labels": []}'
    from tests.api.conftest import assert_problem

    assert_problem(client.post("/measure", content=big, headers={"content-type": "application/json"}), 413, "body")


def test_openapi_keeps_the_json_request_schema(client):
    body = client.get("/openapi.json").json()["paths"]["/measure"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    assert {"features", "labels", "options", "remap_labels"} <= set(schema["properties"])
    assert "multipart/form-data" in body

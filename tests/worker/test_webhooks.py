"""Webhooks (issue 8): callback_url on jobs and sweeps, signed POSTs to a real HTTP receiver on 127.0.0.1,
retries with back-off, attempts stored, one delivery per webhook under concurrent dispatchers."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from db import jobs as dbjobs
from db import webhooks as dbhooks
from tests.api.conftest import (_migrated_template, api_db_url, app, client, queue,  # noqa: F401
                                sessionmaker, settings)
from tests.api.fakework import run_job
from worker.webhooks import backoff_seconds, dispatch

CONFIG = {"data": {"name": "teacher", "n": 100}, "model": {"depth": 2, "width": 8}, "schedule": {"epochs": 2}}


class Receiver:
    """A tiny HTTP server on 127.0.0.1 (ephemeral port) that records every POST and answers the next code of
    ``codes`` (the last one repeats)."""

    def __init__(self, codes=(200,)):
        self.codes = list(codes)
        self.received: list[tuple[dict, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = outer.codes.pop(0) if len(outer.codes) > 1 else outer.codes[0]
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _hmac(secret: str, body: bytes) -> str:  # the reference: RFC 2104 via the standard library
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _job(client, url):
    out = client.post("/jobs", json={"kind": "train", "config": CONFIG, "callback_url": url})
    assert out.status_code == 202, out.text
    return out.json()["id"]


def test_job_webhook_is_signed_and_stored(client, sessionmaker, settings):
    with Receiver([200]) as rx:
        jid = _job(client, rx.url)
        assert dispatch(sessionmaker, settings) == []  # still queued: nothing to send
        run_job(sessionmaker, jid)
        done = dispatch(sessionmaker, settings, job_id=jid)
        assert [h.status for h in done] == ["delivered"]
        assert dispatch(sessionmaker, settings) == []  # delivered once, never again
    assert len(rx.received) == 1
    headers, body = rx.received[0]
    secret = client.get("/webhooks/secret").json()["secret"]
    assert headers["x-ncs-signature-256"] == _hmac(secret, body)
    assert headers["x-ncs-signature-256"] != _hmac(secret + "x", body)
    assert headers["x-ncs-event"] == "job.finished" and headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["job"]["id"] == jid and payload["job"]["status"] == "succeeded"
    assert payload["delivery"] == headers["x-ncs-delivery"]
    hooks = client.get("/webhooks", params={"job_id": jid}).json()
    assert len(hooks) == 1 and hooks[0]["status"] == "delivered" and hooks[0]["url"] == rx.url
    assert [(d["attempt"], d["status_code"], d["ok"]) for d in hooks[0]["deliveries"]] == [(1, 200, True)]


def test_retries_with_backoff_then_delivers(client, sessionmaker, settings):
    fast = settings.model_copy(update={"webhook_backoff_seconds": 0.0})
    with Receiver([500, 503, 200]) as rx:
        jid = _job(client, rx.url)
        run_job(sessionmaker, jid)
        assert [h.status for h in dispatch(sessionmaker, fast, job_id=jid)] == ["pending"]
        assert [h.status for h in dispatch(sessionmaker, fast)] == ["pending"]
        assert [h.status for h in dispatch(sessionmaker, fast)] == ["delivered"]
    assert len(rx.received) == 3
    assert len({h["x-ncs-delivery"] for h, _ in rx.received}) == 1  # same delivery id on every retry
    hook = client.get("/webhooks", params={"job_id": jid}).json()[0]
    assert [(d["attempt"], d["status_code"], d["ok"]) for d in hook["deliveries"]] == \
        [(1, 500, False), (2, 503, False), (3, 200, True)]


def test_backoff_schedule_and_giving_up(client, sessionmaker, settings):
    slow = settings.model_copy(update={"webhook_backoff_seconds": 2.0})
    assert [backoff_seconds(slow, k) for k in range(1, 6)] == [2, 4, 8, 16, 32]
    assert backoff_seconds(slow, 40) == 3600  # capped at one hour
    with Receiver([503]) as rx:
        jid = _job(client, rx.url)
        run_job(sessionmaker, jid)
        hook = dispatch(sessionmaker, slow, job_id=jid)[0]
        assert hook.status == "pending"
        wait = (hook.next_attempt_at - hook_attempt_time(sessionmaker, hook.id)).total_seconds()
        assert wait == pytest.approx(2.0, abs=0.5)
        assert dispatch(sessionmaker, slow) == []  # not due yet
        quick = settings.model_copy(update={"webhook_backoff_seconds": 0.0, "webhook_max_attempts": 3})
        with sessionmaker() as s:  # make it due now
            dbhooks.record_attempt(s, hook, status_code=None, error="test: due now", duration_ms=0, ok=False,
                                   retry_at=hook.next_attempt_at.replace(year=2000))
        states = [dispatch(sessionmaker, quick)[0].status for _ in range(2)]
        assert states == ["pending", "failed"]
        assert dispatch(sessionmaker, quick) == []
    assert len(rx.received) == 3  # attempts 1, 2, 3 reached the receiver


def hook_attempt_time(sessionmaker, hook_id):
    with sessionmaker() as s:
        return dbhooks.deliveries(s, hook_id)[-1].at


def test_client_error_fails_at_once_and_unreachable_retries(client, sessionmaker, settings):
    with Receiver([404]) as rx:
        jid = _job(client, rx.url)
        run_job(sessionmaker, jid)
        assert [h.status for h in dispatch(sessionmaker, settings, job_id=jid)] == ["failed"]
    with Receiver([200]) as closed:
        url = closed.url
    jid = _job(client, url)  # nobody listens there any more: connection refused, retried later
    run_job(sessionmaker, jid)
    hook = dispatch(sessionmaker, settings, job_id=jid)[0]
    assert hook.status == "pending"
    with sessionmaker() as s:
        d = dbhooks.deliveries(s, hook.id)
    assert d[0].status_code is None and "Connect" in d[0].error


def test_sweep_webhook_after_the_last_job_once(client, sessionmaker, settings):
    with Receiver([200]) as rx:
        out = client.post("/sweeps", json={"base": CONFIG, "grid": {"model.batch_norm": ["affine", "none"],
                                                                    "model.width": [8, 16]},
                                           "seeds": [0], "callback_url": rx.url})
        assert out.status_code == 202, out.text
        sid, jobs = out.json()["id"], [j["id"] for j in out.json()["jobs"]]
        assert len(jobs) == 2
        run_job(sessionmaker, jobs[0])
        assert dispatch(sessionmaker, settings, job_id=jobs[0]) == []  # one job still queued
        with sessionmaker() as s:
            dbjobs.request_cancel(s, jobs[1])  # queued -> canceled, no worker involved
        results: list = []
        racers = [threading.Thread(target=lambda: results.extend(dispatch(sessionmaker, settings)))
                  for _ in range(3)]
        for t in racers:
            t.start()
        for t in racers:
            t.join()
        assert [h.status for h in results] == ["delivered"]
    assert len(rx.received) == 1
    payload = json.loads(rx.received[0][1])
    assert payload["event"] == "sweep.finished" and payload["sweep"]["id"] == sid
    assert payload["sweep"]["status"] == "canceled" and payload["sweep"]["counts"] == {"succeeded": 1,
                                                                                     "canceled": 1}


def test_secret_per_api_key_and_bad_callback_url(client, settings):
    from ncservice import webhooks as signing

    root = signing.server_secret(settings)
    assert len(root) == 64 and signing.server_secret(settings) == root  # persisted under data_dir
    assert signing.secret_for(settings, None) == root
    a, b = signing.secret_for(settings, "key-a"), signing.secret_for(settings, "key-b")
    assert a != b and a == hmac.new(root.encode(), b"ncs-webhook:key-a", hashlib.sha256).hexdigest()
    assert signing.verify(a, b"{}", _hmac(a, b"{}")) and not signing.verify(b, b"{}", _hmac(a, b"{}"))
    bad = client.post("/jobs", json={"kind": "train", "config": CONFIG, "callback_url": "ftp://x/y"})
    assert bad.status_code == 422 and "callback_url" in json.dumps(bad.json())

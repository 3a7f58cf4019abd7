"""Benchmark the API under polling load (issue 7, "Load"): N concurrent clients poll ``GET /jobs/{id}`` for T
seconds while a sweep trains, against the embedded default (SQLite + filesystem broker) and against PostgreSQL
(+ Redis). Each backend runs as ``ncservice serve`` in a subprocess (uvicorn, a real Celery worker, the
reconciler) on a fresh data folder / database; the clients are asyncio tasks over one httpx connection pool.

Prints, per backend: requests, requests/s, p50/p90/p99/max latency (ms), error count (non-200/304 answers and
transport errors), how far the sweep got, and the API process's peak RSS. Never asserts on time (goal of the
issue on the 2-core machine: zero errors, p99 under 100 ms).

Usage: ``.venv/bin/python bench/bench_api.py --clients 200 --seconds 60 --backends embedded,postgres``
(``--etag`` sends ``If-None-Match`` as a well-behaved poller would; PostgreSQL/Redis URLs from
``NCS_TEST_POSTGRES_URL`` / ``NCS_TEST_REDIS_URL`` or their local defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("NCS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("NCS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
SWEEP = {"name": "bench", "base": {"data": {"name": "teacher", "n": 256, "num_classes": 4, "input_dim": 16,
                                            "teacher_width": 32},
                                   "model": {"depth": 3, "width": 32}, "optim": {"batch_size": 32},
                                   "schedule": {"epochs": 4000}, "measure": {"every": 50}},
         "grid": {"model.batch_norm": ["affine", "none"]}, "seeds": [0, 1]}


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _rss_mb(pid: int) -> float:
    """Peak RSS (VmHWM) of a process, MB (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _api_pid(serve_pid: int) -> int | None:
    """The uvicorn child of ``ncservice serve``."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == serve_pid and "uvicorn" in cmd:
            return int(d.name)
    return None


class Service:
    """``ncservice serve`` on a free port with the given environment; stopped with SIGINT."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "ncservice.cli", "serve", "--port", str(self.port)],
                                     env={**os.environ, **env, "PYTHONPATH": str(REPO)}, cwd=env["NCS_DATA_DIR"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
            if self.proc.poll() is not None:
                raise RuntimeError(f"ncservice serve exited with {self.proc.returncode}")
        raise RuntimeError("the service did not start in 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


async def _poll(url: str, job_ids: list[str], clients: int, seconds: float, etag: bool,
                interval: float = 0.0) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        stop_at = time.perf_counter() + seconds

        async def client(i: int) -> None:
            tags: dict[str, str] = {}
            k = i
            while time.perf_counter() < stop_at:
                jid = job_ids[k % len(job_ids)]
                k += 1
                headers = {"If-None-Match": tags[jid]} if etag and jid in tags else {}
                t0 = time.perf_counter()
                try:
                    r = await http.get(f"/jobs/{jid}", headers=headers)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if r.status_code not in (200, 304):
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                elif r.status_code == 200 and "etag" in r.headers:
                    tags[jid] = r.headers["etag"]
                if interval:
                    await asyncio.sleep(interval)

        t_start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - t_start
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"requests": len(latencies), "elapsed": elapsed, "rps": len(latencies) / elapsed,
            "p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)), "max": float(lat.max()),
            "errors": sum(errors.values()), "error_kinds": errors}


def run_backend(name: str, clients: int, seconds: float, etag: bool, interval: float = 0.0) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"ncs-bench-{name}-"))
    env = {"NCS_DATA_DIR": str(tmp), "NCS_HOST": "127.0.0.1"}
    pg_db = None
    if name == "postgres":
        from sqlalchemy import create_engine, text

        pg_db = f"ncs_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{pg_db}"'))
        admin.dispose()
        env.update({"NCS_DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + "/" + pg_db, "NCS_BROKER_URL": REDIS,
                    "NCS_BROKER_KEY_PREFIX": f"ncs_bench_{uuid.uuid4().hex[:8]}_"})
    svc = Service(env)
    try:
        r = httpx.post(svc.url + "/sweeps", json=SWEEP, timeout=30)
        r.raise_for_status()
        job_ids = [j["id"] for j in r.json()["jobs"]]
        # wait until the sweep trains, so the polling overlaps real worker writes
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(httpx.get(f"{svc.url}/jobs/{j}", timeout=30).json()["status"] == "running" for j in job_ids):
                break
            time.sleep(0.2)
        out = asyncio.run(_poll(svc.url, job_ids, clients, seconds, etag, interval))
        progress = [httpx.get(f"{svc.url}/jobs/{j}", timeout=60).json() for j in job_ids]
        out["sweep"] = ", ".join(f"{p['status']} {(p['progress'] or {}).get('epoch')}" for p in progress)
        pid = _api_pid(svc.proc.pid)
        out["api_peak_rss_mb"] = _rss_mb(pid) if pid else float("nan")
        for j in job_ids:
            httpx.post(f"{svc.url}/jobs/{j}/cancel", timeout=60)
    finally:
        svc.stop()
        if pg_db:
            from sqlalchemy import create_engine, text

            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))
            admin.dispose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--backends", default="embedded,postgres")
    ap.add_argument("--etag", action="store_true", help="send If-None-Match (304 when unchanged)")
    ap.add_argument("--interval", type=float, default=0.0,
                    help="seconds each client waits between polls (0: closed loop, as fast as answered; the API "
                         "asks pollers for Retry-After seconds)")
    args = ap.parse_args()
    print(f"{args.clients} clients polling GET /jobs/{{id}} for {args.seconds:g} s while a sweep of "
          f"{len(SWEEP['grid']['model.batch_norm']) * len(SWEEP['seeds'])} runs trains (etag={args.etag}); "
          f"interval {args.interval:g} s; {os.cpu_count()} CPUs")
    header = f"{'backend':<10} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} " \
             f"{'max ms':>8} {'errors':>7} {'api RSS MB':>10}  sweep (status epoch per job)"
    rows = []
    for name in args.backends.split(","):
        res = run_backend(name.strip(), args.clients, args.seconds, args.etag, args.interval)
        rows.append(f"{name:<10} {res['requests']:>9} {res['rps']:>8.1f} {res['p50']:>8.1f} {res['p90']:>8.1f} "
                    f"{res['p99']:>8.1f} {res['max']:>8.1f} {res['errors']:>7} {res['api_peak_rss_mb']:>10.0f}  "
                    f"{res['sweep']}" + (f"  errors: {res['error_kinds']}" if res["errors"] else ""))
        print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)


if __name__ == "__main__":
    main()

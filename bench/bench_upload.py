"""Benchmark the API's memory during a large upload (issue 7, "Hostile input": the API's memory stays bounded
during a 2 GB upload).

Generates a float32 ``features.npy`` of ``--size-gb`` GB (and its int64 ``labels.npy``) on disk, chunk by chunk,
starts the API alone (``uvicorn api.app:create_app --factory`` in a subprocess; embedded SQLite under a fresh
data folder, ``NCS_MAX_UPLOAD_BYTES`` = ``--limit-gb`` GB), streams both files with httpx from open file
handles (multipart, never read whole) to ``POST /measure?async=true``, and samples the server process's RSS
(psutil if installed, else ``/proc/<pid>/status`` ``VmRSS``) every 20 ms meanwhile. No worker runs: the job
stays queued; what is measured is the API receiving, checking and storing the upload.

Prints the server's RSS before, peak during (sampled, and the kernel's ``VmHWM``), the upload's size, wall
time and throughput, and the answer. Deletes the generated files and the data folder (with the stored upload)
at the end. Never asserts on time or memory.

Usage: ``.venv/bin/python bench/bench_upload.py --size-gb 2 [--dir /tmp]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench_api import _free_port  # the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """Resident set size of ``pid`` in MB (psutil when installed; else ``/proc/<pid>/status``, Linux).
    ``key="VmHWM"`` reads the kernel's peak RSS instead (``/proc`` only)."""
    if key == "VmRSS":
        try:
            import psutil

            return psutil.Process(pid).memory_info().rss / 1024**2
        except ImportError:
            pass
        except Exception:  # noqa: BLE001 - the process is gone
            return float("nan")
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def generate(folder: Path, size_bytes: int, dim: int = 256, chunk_rows: int = 1 << 16) -> tuple[Path, Path]:
    """Write ``features.npy`` (float32, ``(N, dim)`` with ``N*dim*4 ~= size_bytes``) and ``labels.npy``
    (int64, 10 classes) to ``folder`` chunk by chunk (bounded memory)."""
    n = max(10, size_bytes // (4 * dim))
    feats = folder / "features.npy"
    labels = folder / "labels.npy"
    rng = np.random.default_rng(0)
    y = np.arange(n, dtype=np.int64) % 10
    np.save(labels, y)
    out = np.lib.format.open_memmap(feats, mode="w+", dtype=np.float32, shape=(n, dim))
    block = rng.standard_normal((chunk_rows, dim), dtype=np.float32)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        out[start:stop] = block[: stop - start] + y[start:stop, None].astype(np.float32)
    out.flush()
    del out
    return feats, labels


class Sampler(threading.Thread):
    """Samples ``rss_mb(pid)`` every ``interval`` seconds; ``peak`` holds the largest value seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self.samples = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            v = rss_mb(self.pid)
            if v == v:  # not NaN
                self.peak = max(self.peak, v)
                self.samples += 1
            time.sleep(self.interval)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of features.npy (GB, 1e9 bytes)")
    ap.add_argument("--limit-gb", type=float, default=3.0, help="NCS_MAX_UPLOAD_BYTES (GiB)")
    ap.add_argument("--dir", default=None, help="folder for the generated files and the data folder")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ncs-bench-upload-", dir=args.dir))
    proc = None
    try:
        t = time.perf_counter()
        feats, labels = generate(work, int(args.size_gb * 1e9))
        total = feats.stat().st_size + labels.stat().st_size
        print(f"generated {feats.stat().st_size / 1e9:.3f} GB features.npy + {labels.stat().st_size / 1e6:.1f} MB "
              f"labels.npy in {time.perf_counter() - t:.1f} s ({work})", flush=True)

        data = work / "data"
        data.mkdir()
        env = {**os.environ, "PYTHONPATH": str(REPO), "NCS_DATA_DIR": str(data), "NCS_HOST": "127.0.0.1",
               "NCS_MAX_UPLOAD_BYTES": str(int(args.limit_gb * 1024**3))}
        subprocess.run([sys.executable, "-m", "ncservice.cli", "migrate"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                env=env, cwd=work, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.2)
        httpx.get(url + "/jobs", timeout=30)  # warm: first DB query, routes, pydantic
        before = rss_mb(proc.pid)
        sampler = Sampler(proc.pid)
        sampler.start()
        t = time.perf_counter()
        with open(feats, "rb") as fh, open(labels, "rb") as lh:
            r = httpx.post(url + "/measure", params={"async": "true"}, timeout=None,
                           files={"features": ("features.npy", fh, "application/octet-stream"),
                                  "labels": ("labels.npy", lh, "application/octet-stream")})
        elapsed = time.perf_counter() - t
        sampler.stopped.set()
        sampler.join()
        hwm = rss_mb(proc.pid, "VmHWM")
        print(f"POST /measure?async=true -> {r.status_code} {r.text[:200]}")
        print(f"uploaded {total / 1e9:.3f} GB in {elapsed:.1f} s: {total / 1e6 / elapsed:.0f} MB/s")
        print(f"API RSS: before {before:.0f} MB, peak during upload {sampler.peak:.0f} MB (sampled every 20 ms, "
              f"{sampler.samples} samples; kernel VmHWM {hwm:.0f} MB), growth {sampler.peak - before:.0f} MB "
              f"for a {total / 1e9:.2f} GB body; load average {os.getloadavg()[0]:.2f}")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        print(f"removed {work}")


if __name__ == "__main__":
    main()

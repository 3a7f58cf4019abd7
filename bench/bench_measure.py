"""Benchmark ``ncengine.metrics.measure`` on a large on-disk ``.npy`` (issue 2).

Writes N x d float32 features (default N=1,000,000, d=512, C=100: 2 GB) and labels to a folder, then runs, each
in its own subprocess so that peak RSS is per phase:

* ``floor``    read the features file once, sequentially (the I/O floor), from the disk (``cold``: its pages
  evicted from the page cache first with ``posix_fadvise``) and from the page cache (``warm``);
* ``measure``  ``measure(load_array(features.npy), labels, W, b)`` (memory-mapped, streamed, two passes), cold
  and warm as the floor;
* ``baseline`` a straightforward in-memory float64 numpy implementation (whole array loaded and converted,
  per-class loops, full d x d within-class covariance, ``np.linalg.pinv``, per-class NCC distances).

Prints wall and CPU seconds, ratios (baseline / measure, measure / floor), peak RSS (MB) per phase and the load
average around the measurement (the machine is shared: wall times move with other people's jobs, CPU seconds
much less). Never asserts on time.
Usage: ``.venv/bin/python bench/bench_measure.py --n 200000`` (``--skip-baseline`` to leave out the slow one,
``--threads K`` for ``measure(..., threads=K)``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    """Peak resident set of this process image (VmHWM; ru_maxrss would include the parent's before exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate(folder: Path, n: int, d: int, C: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centers = (3.0 * rng.normal(size=(C, d))).astype(np.float32)
    y = rng.integers(0, C, size=n)
    y[:C] = np.arange(C)
    np.save(folder / "labels.npy", y)
    out = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32, shape=(n, d))
    step = 1 << 16
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = centers[y[a:b]] + rng.standard_normal(size=(b - a, d), dtype=np.float32)
    out.flush()
    del out
    np.save(folder / "weights.npy", rng.normal(size=(C, d)) * 0.05)
    np.save(folder / "bias.npy", rng.normal(size=C) * 0.05)


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (``posix_fadvise(DONTNEED)``; no root needed), so the next read
    comes from the disk, as it does for a file larger than memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def phase_floor(folder: Path, cold: bool = False) -> dict:
    if cold:
        evict(folder / "features.npy")
    buf = bytearray(64 << 20)
    t, cpu = time.perf_counter(), time.process_time()
    total = 0
    with open(folder / "features.npy", "rb", buffering=0) as f:
        while (k := f.readinto(buf)) > 0:
            total += k
    return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu, "bytes": total}


def phase_measure(folder: Path, chunk_size: int, threads: int, cold: bool = False) -> dict:
    import torch

    from ncengine.io import load_array
    from ncengine.metrics import measure

    torch.zeros(1)  # initialise torch's allocator before timing
    if cold:
        evict(folder / "features.npy")
    rss0 = _peak_rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    H = load_array(folder / "features.npy", field="features")
    y = np.load(folder / "labels.npy")
    W, b = np.load(folder / "weights.npy"), np.load(folder / "bias.npy")
    r = measure(H, y, W, b, chunk_size=chunk_size, threads=threads).to_dict()
    sec, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = _peak_rss_mb()  # before the compute floor's own matrices
    # a compute floor: pass 2's one big product, (N, d) @ (d, k + 1 + C) in float64 with k = C - 1, at the rate
    # this machine reaches on that product for one chunk
    N, d = H.shape
    C = W.shape[0]
    A = torch.randn(min(chunk_size, N), d, dtype=torch.float64)
    B = torch.randn(d, 2 * C, dtype=torch.float64)
    A @ B
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        A @ B
    rate = reps * 2 * A.shape[0] * d * B.shape[1] / (time.perf_counter() - t0)
    return {"seconds": sec, "cpu_seconds": cpu, "rss_after_imports_mb": rss0, "nc1": r["nc1"], "ncc_accuracy": r["ncc_accuracy"],
            "intra_cos_mean": r["intra_cos_mean"], "loss": r["loss"], "torch_threads": torch.get_num_threads(),
            "threads": threads, "product_flops": 2 * N * d * 2 * C, "f64_rate": rate, "peak_rss_mb": peak}


def phase_baseline(folder: Path) -> dict:
    t, cpu = time.perf_counter(), time.process_time()
    H = np.load(folder / "features.npy").astype(np.float64)
    y = np.load(folder / "labels.npy")
    W, b = np.load(folder / "weights.npy"), np.load(folder / "bias.npy")
    N, d = H.shape
    C = int(y.max()) + 1
    idx = [np.flatnonzero(y == c) for c in range(C)]
    mu = np.stack([H[i].mean(0) for i in idx])
    muG = mu.mean(0)
    M = mu - muG
    SW = np.zeros((d, d))
    var = np.zeros(C)
    for c in range(C):
        D = H[idx[c]] - mu[c]
        SW += D.T @ D
        var[c] = np.mean(np.sum(D * D, axis=1))
    SW /= N
    SB = M.T @ M / C
    nc1 = float(np.trace(SW @ np.linalg.pinv(SB, hermitian=True)) / C)
    s = np.stack([(H[i] / np.linalg.norm(H[i], axis=1, keepdims=True)).mean(0) for i in idx])
    inter = s @ s.T
    cdnv = np.mean([(var[c] + var[k]) / (2 * np.sum((mu[c] - mu[k]) ** 2)) for c in range(C) for k in range(c + 1, C)])
    dist = np.empty((N, C))
    for c in range(C):
        dist[:, c] = np.sum((H - mu[c]) ** 2, axis=1)
    ncc = dist.argmin(1)
    logits = H @ W.T + b
    mx = logits.max(1, keepdims=True)
    ce = np.log(np.exp(logits - mx).sum(1)) + mx[:, 0] - logits[np.arange(N), y]
    loss = float(np.mean([ce[i].mean() for i in idx]))
    agree = float(np.mean(logits.argmax(1) == ncc))
    sec, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"seconds": sec, "cpu_seconds": cpu, "nc1": nc1, "ncc_accuracy": float(np.mean(ncc == y)), "loss": loss,
            "intra_cos_mean": float(np.diagonal(inter).mean()), "cdnv": float(cdnv), "agree": agree}


def _run_phase(name: str, folder: Path, extra: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", name, "--dir", str(folder), *extra],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--c", type=int, default=100)
    ap.add_argument("--chunk-size", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=1, help="measure(..., threads=K) worker threads")
    ap.add_argument("--dir", type=Path, default=None, help="folder for the files (default: a temporary one)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--phase", choices=["generate", "floor", "measure", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        res = {"generate": lambda: generate(args.dir, args.n, args.d, args.c) or {},
               "floor": lambda: phase_floor(args.dir, args.cold),
               "measure": lambda: phase_measure(args.dir, args.chunk_size, args.threads, args.cold),
               "baseline": lambda: phase_baseline(args.dir)}[args.phase]()
        res.setdefault("peak_rss_mb", _peak_rss_mb())
        print(json.dumps(res))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        _run_phase("generate", folder, ["--n", str(args.n), "--d", str(args.d), "--c", str(args.c)])
        gb = os.path.getsize(folder / "features.npy") / 1e9
        print(f"generated N={args.n} d={args.d} C={args.c} float32: {gb:.2f} GB in {time.perf_counter() - t:.1f} s")
        load0 = os.getloadavg()[0]
        margs = ["--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
        # cold: the file's pages evicted first, so it is read from the disk (a file larger than memory always
        # is); warm: from the page cache (the floor is then memory bandwidth, not I/O)
        runs = {cache: (_run_phase("floor", folder, flag), _run_phase("measure", folder, margs + flag))
                for cache, flag in (("cold", ["--cold"]), ("warm", []))}
        print(f"load average (1 min) before {load0:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
              "(a shared machine makes wall times noisy; CPU seconds much less)")
        for cache, (floor, meas) in runs.items():
            print(f"[{cache}] read floor : {floor['seconds']:8.2f} s  (cpu {floor['cpu_seconds']:.2f} s)  "
                  f"peak RSS {floor['peak_rss_mb']:7.0f} MB")
            print(f"[{cache}] measure    : {meas['seconds']:8.2f} s  (cpu {meas['cpu_seconds']:.2f} s)  "
                  f"peak RSS {meas['peak_rss_mb']:7.0f} MB "
                  f"(after imports {meas['rss_after_imports_mb']:.0f} MB; measure threads {meas['threads']}, "
                  f"torch threads {meas['torch_threads']})")
            print(f"[{cache}] measure / floor = {meas['seconds'] / floor['seconds']:.2f}x wall, "
                  f"measure cpu / floor wall = {meas['cpu_seconds'] / floor['seconds']:.2f}x")
        meas = runs["warm"][1]
        print(f"compute floor: pass 2's float64 product, {meas['product_flops']:.2e} flops at "
              f"{meas['f64_rate'] / 1e9:.1f} GFLOP/s (this machine, that shape) = "
              f"{meas['product_flops'] / meas['f64_rate']:.2f} s")
        if not args.skip_baseline:
            base = _run_phase("baseline", folder, [])
            print(f"baseline   : {base['seconds']:8.2f} s  (cpu {base['cpu_seconds']:.2f} s)  "
                  f"peak RSS {base['peak_rss_mb']:7.0f} MB")
            print(f"baseline / measure = {base['seconds'] / meas['seconds']:.2f}x wall, "
                  f"{base['cpu_seconds'] / meas['cpu_seconds']:.2f}x cpu")
            for k in ("nc1", "ncc_accuracy", "loss", "intra_cos_mean"):
                rel = abs(base[k] - meas[k]) / max(abs(base[k]), 1e-300)
                print(f"  {k:15s} measure {meas[k]:.12g}  baseline {base[k]:.12g}  rel diff {rel:.1e}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()

"""Benchmark: the 21 runs of ``thesis-fig3.1`` trained (a) as one batched ensemble, (b) as 21 plain loops.

(a) ``ncengine.train`` (members stacked on a leading axis, ``torch.baddbmm``, hand-written SGD).
(b) for each run: ``torch.utils.data.DataLoader`` (shuffle, batch 128) + ``nn.Sequential`` + ``torch.optim.SGD``.
Both train the full-scale preset (teacher data N=10000, input 32, C=10, depth 6, width 256, batch 128) for a
few epochs in the same process. Prints run-epochs/second of each, the ratio, and the ensemble's achieved FLOP/s
(6 * sum(in*out) per sample per member: forward 2, backward 4) as a fraction of this machine's dense matmul
FLOP/s, measured in the same run on a large square matmul and on the ensemble's own bmm shape.
Never asserts on time; pytest does not collect it.

Usage::

    .venv/bin/python bench/bench_train.py --epochs 2 [--loop-runs 21] [--device auto]
    .venv/bin/python bench/bench_train.py --full      # one full 300-epoch thesis-fig3.1 sweep, wall time
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ncengine.data import load
from ncengine.models import build_mlp
from ncengine.sweep import expand, preset
from ncengine.train import _Bundle, lr_at_epoch, resolve_device, run


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_flops(dev: torch.device, n: int = 2048, reps: int = 10) -> float:
    """Dense float32 matmul FLOP/s (2 n^3 per product), best of ``reps``."""
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    a @ b
    _sync(dev)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def bmm_flops(dev: torch.device, M: int, B: int, w: int, reps: int = 20) -> float:
    """FLOP/s of the ensemble's hidden-layer bmm shape (M, B, w) @ (M, w, w)."""
    a, b = torch.randn(M, B, w, device=dev), torch.randn(M, w, w, device=dev)
    torch.bmm(a, b)
    _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        torch.bmm(a, b)
    _sync(dev)
    return reps * 2 * M * B * w * w / (time.perf_counter() - t)


def flops_per_sample(d_in: int, width: int, depth: int, C: int) -> int:
    dims = [d_in] + [width] * (depth - 1) + [C]
    return 6 * sum(i * o for i, o in zip(dims[:-1], dims[1:]))


def bench_ensemble(cfgs, data, dev: torch.device, epochs: int) -> float:
    bundle = _Bundle(cfgs, data, dev)
    bundle.train_epoch(0)  # warm-up epoch, not timed
    _sync(dev)
    t = time.perf_counter()
    for e in range(1, epochs + 1):
        bundle.train_epoch(e)
    _sync(dev)
    return time.perf_counter() - t


def bench_loops(cfgs, data, dev: torch.device, epochs: int) -> float:
    X, y = data.X.float().to(dev), data.y.to(dev)
    total = 0.0
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        model = build_mlp(data.input_dim, cfg.model.width, cfg.model.depth, data.num_classes,
                          cfg.model.batch_norm).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                             batch_size=cfg.optim.batch_size, shuffle=True)
        loss_fn = nn.CrossEntropyLoss()

        def epoch(e: int) -> None:
            for g in opt.param_groups:
                g["lr"] = lr_at_epoch(cfg, e)
            model.train()
            for xb, yb in loader:
                loss = loss_fn(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()

        epoch(0)  # warm-up, not timed
        _sync(dev)
        t = time.perf_counter()
        for e in range(1, epochs + 1):
            epoch(e)
        _sync(dev)
        total += time.perf_counter() - t
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per run (after one warm-up epoch)")
    ap.add_argument("--loop-runs", type=int, default=21, help="how many of the 21 runs the loop baseline trains "
                    "(its rate is per run-epoch, so fewer runs only shortens the benchmark)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--full", action="store_true", help="train the full 300-epoch sweep once and print wall time")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cfgs = expand(preset("thesis-fig3.1", scale="full"))
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} runs={len(cfgs)}")
    if args.full:
        t = time.perf_counter()
        res = run(cfgs, device=dev)
        wall = time.perf_counter() - t
        conv = sum(r.final["converged"] for r in res)
        print(f"full thesis-fig3.1 sweep (21 runs x 300 epochs): wall {wall:.1f} s ({wall / 3600:.2f} h), "
              f"{conv}/21 converged")
        return

    data = load(cfgs[0].data)
    c0 = cfgs[0]
    fps = flops_per_sample(data.input_dim, c0.model.width, c0.model.depth, data.num_classes)
    peak = matmul_flops(dev)
    shape_rate = bmm_flops(dev, len(cfgs), c0.optim.batch_size, c0.model.width)

    t_ens = bench_ensemble(cfgs, data, dev, args.epochs)
    ens_rate = len(cfgs) * args.epochs / t_ens  # run-epochs per second
    loop_cfgs = cfgs[: args.loop_runs]
    t_loop = bench_loops(loop_cfgs, data, dev, args.epochs)
    loop_rate = len(loop_cfgs) * args.epochs / t_loop

    achieved = ens_rate * len(data) * fps
    print(f"N={len(data)} width={c0.model.width} depth={c0.model.depth} batch={c0.optim.batch_size} "
          f"timed epochs={args.epochs}")
    print(f"(a) batched ensemble : {ens_rate:8.3f} run-epochs/s  ({t_ens:.2f} s for {len(cfgs)} runs)")
    print(f"(b) straightforward  : {loop_rate:8.3f} run-epochs/s  ({t_loop:.2f} s for {len(loop_cfgs)} runs)")
    print(f"ratio (a)/(b)        : {ens_rate / loop_rate:8.2f} x   (goal >= 3x)")
    print(f"dense matmul rate    : {peak / 1e9:8.1f} GFLOP/s (2048^3 float32)")
    print(f"ensemble bmm shape   : {shape_rate / 1e9:8.1f} GFLOP/s ({len(cfgs)}x{c0.optim.batch_size}x"
          f"{c0.model.width} @ {c0.model.width}x{c0.model.width})")
    print(f"ensemble achieved    : {achieved / 1e9:8.1f} GFLOP/s = {achieved / peak:6.1%} of the matmul rate "
          f"(goal >= 30%)")
    est = 300 * len(cfgs) / ens_rate
    print(f"estimated full sweep (21 x 300 epochs, training only): {est:.0f} s ({est / 3600:.2f} h)")


if __name__ == "__main__":
    main()

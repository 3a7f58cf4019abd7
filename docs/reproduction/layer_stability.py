"""Per-layer tables of a finished ``thesis-fig3.3`` job, read from a running service (REPRODUCTION.md (d), (f)).

Prints, for each run (weight decay) and hidden layer 1..L-1: the gap ``intra_cos_min - inter_cos_max`` at the
last measurement, and how much ``inter_cos_max`` moved over the measurements of the last epochs (max - min),
from ``GET /jobs/{id}/metrics``.

Usage: ``.venv/bin/python docs/reproduction/layer_stability.py --url http://127.0.0.1:8133 --job JOB_ID``
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from ncservice.client import NCClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--since", type=int, default=200, help="first epoch of the window (default 200)")
    args = ap.parse_args()
    client = NCClient(args.url)
    runs = client.get_job(args.job)["config"]["runs"]
    wds = {i: run["optim"]["weight_decay"] for i, run in enumerate(runs)}
    series: dict[tuple[int, int], list[tuple[int, dict]]] = defaultdict(list)
    for p in client.job_metrics(args.job):
        if p["layer"] >= 1:
            series[(p["run_index"], p["layer"])].append((p["epoch"], p["metrics"]))
    layers = sorted({layer for _, layer in series})

    def row(run: int, f) -> str:
        return " ".join(f(sorted(series[(run, layer)], key=lambda t: t[0])) for layer in layers)

    def fmt(v) -> str:
        return "   —" if v is None else f"{v:5.2f}"

    def gap(pts) -> str:
        m = pts[-1][1]
        ok = m.get("intra_cos_min") is not None and m.get("inter_cos_max") is not None
        return fmt(m["intra_cos_min"] - m["inter_cos_max"] if ok else None)

    def moved(pts) -> str:
        vals = [m["inter_cos_max"] for e, m in pts if e >= args.since and m.get("inter_cos_max") is not None]
        return fmt(max(vals) - min(vals) if vals else None)

    print(f"intra_cos_min - inter_cos_max at the last measurement, layers {layers[0]}..{layers[-1]}")
    for run in sorted(wds):
        print(f"wd {wds[run]:<7g}" + row(run, gap))
    print(f"max - min of inter_cos_max over the measurements at epochs >= {args.since}")
    for run in sorted(wds):
        print(f"wd {wds[run]:<7g}" + row(run, moved))


if __name__ == "__main__":
    main()

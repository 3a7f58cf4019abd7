"""``ncservice reproduce``: run a thesis preset through the running service and draw its figures.

Everything goes over HTTP (:class:`ncservice.client.NCClient`): ``POST /sweeps {"preset", "scale"}``, poll
``/sweeps/{id}`` with a progress bar, ``GET /sweeps/{id}/results`` (json), then per job what a figure needs:
``GET /jobs/{id}`` (``latest_metrics``: every layer at the final epoch, for Figure 3.3) and
``GET /jobs/{id}/metrics`` (the history of one run, for its training curves). Output files in ``out``:

- ``results.csv``: one row per run (:func:`ncservice.figures.results_csv`), ``results.json``: the raw rows;
- ``fig3.1.png`` (preset ``thesis-fig3.1``) or ``fig3.3.png`` + ``fig3.3_layers.csv`` (``thesis-fig3.3``);
- ``training_curves.png``: loss, accuracy, cosines and NC1 vs epoch of the first run that has a result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ncservice import figures
from ncservice.client import NCClient

PRESETS = ("thesis-fig3.1", "thesis-fig3.3")


class OutputError(OSError):
    """The output folder ``out`` could not be made or a file in it not written (an :class:`OSError`: ``errno``,
    ``strerror`` and ``filename`` are those of the failed operation)."""

    @classmethod
    def wrap(cls, exc: OSError, path: Path) -> OutputError:
        return cls(exc.errno, exc.strerror or str(exc), str(exc.filename if exc.filename is not None else path))


def prepare_out(out: Path) -> None:
    """Create ``out`` (and its parents) and check that a file can be written in it, so an unusable folder is
    refused before anything is submitted.

    Raises:
        OutputError: ``out`` (or a parent) is a file, cannot be created, or is not writable.
    """
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".ncs-write-check-"):
            pass
    except OSError as exc:
        raise OutputError.wrap(exc, out) from exc


def layer_rows(client: NCClient, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Final per-layer metrics of every run with a result, as layer rows of :func:`figures.build_fig33`.

    Each row is a metric point of the run's latest epoch (``GET /jobs/{id}`` ``latest_metrics``) merged with
    the run's ``weight_decay``, ``seed``, ``effective_depth``, ``job_id`` and ``run_index``.
    """
    by_run = {(r["job_id"], int(r["run_index"])): r for r in runs if r.get("status") == "succeeded"}
    out: list[dict[str, Any]] = []
    for job_id in sorted({k[0] for k in by_run}):
        job = client.get_job(job_id)
        for point in job.get("latest_metrics") or []:
            run = by_run.get((job_id, int(point.get("run_index", 0))))
            if run is None or int(point.get("layer", -1)) < 0:
                continue
            row = figures.flatten_point(point)
            row.update(job_id=job_id, weight_decay=figures._get(run, "weight_decay", "run row"),
                       seed=figures._get(run, "seed", "run row", default=None),
                       effective_depth=run.get("effective_depth"))
            out.append(row)
    return out


def reproduce(client: NCClient, preset: str, scale: str, out: Path, *, progress: bool = True,
              timeout: float | None = None, echo=print) -> dict[str, Path]:
    """Run ``preset`` at ``scale`` through the service and write its figures and CSV into ``out``.

    Args:
        client: a client of the running service.
        preset: ``thesis-fig3.1`` or ``thesis-fig3.3``.
        scale: ``small`` or ``full`` (``ncengine.sweep.preset``).
        out: output folder (created; checked writable before the sweep is submitted).
        progress: draw a progress bar while the sweep runs.
        timeout: seconds to wait for the sweep (``None``: no limit).
        echo: where progress lines go.

    Returns:
        ``{name: path}`` of every file written (``results.csv``, ``results.json``, ``fig3.1.png`` or
        ``fig3.3.png``, ``training_curves.png``) plus the sweep's id and wall time under ``summary.json``.

    Raises:
        ValueError: unknown preset, or no run of the sweep has a result (the CSV is written first).
        NCServiceError: the service refused a request.
        OutputError: ``out`` cannot be made or written to (checked before the sweep is submitted).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r}, expected one of {', '.join(PRESETS)}")
    prepare_out(out)  # before submitting: a bad --out costs no sweep
    t0 = time.monotonic()
    accepted = client.submit_sweep(preset, scale=scale)
    echo(f"sweep {accepted['id']}: {accepted.get('runs')} runs in {len(accepted.get('jobs') or [])} job(s)")
    sweep = client.wait(accepted, progress=progress, timeout=timeout)
    wall = time.monotonic() - t0
    echo(f"sweep {sweep['id']} {sweep['status']} after {wall:.1f} s: {sweep.get('counts')}")
    rows = client.results(sweep["id"], "json")["rows"]
    written: dict[str, Path] = {}

    def write(name: str, data: bytes | str) -> None:
        path = out / name
        try:
            path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        except OSError as exc:
            raise OutputError.wrap(exc, path) from exc
        written[name] = path

    write("results.csv", figures.results_csv(rows))
    write("results.json", json.dumps(rows, indent=1))
    with_result = [r for r in rows if r.get("status") == "succeeded"]
    write("summary.json", json.dumps({"sweep_id": sweep["id"], "preset": preset, "scale": scale,
                                      "status": sweep["status"], "counts": sweep.get("counts"),
                                      "runs": len(rows), "runs_with_result": len(with_result),
                                      "wall_seconds": round(wall, 1), "url": client.base_url}, indent=1))
    if not with_result:
        raise ValueError(f"sweep {sweep['id']} {sweep['status']}: no run has a result; see {out / 'results.csv'}")
    title = f"{preset} ({scale}), sweep {sweep['id'][:8]}"
    if preset == "thesis-fig3.1":
        write("fig3.1.png", figures.fig31(rows, title=f"Figure 3.1: {title}"))
    else:
        layers = layer_rows(client, rows)
        write("fig3.3_layers.csv", figures.results_csv(layers))
        write("fig3.3.png", figures.fig33(layers, rows, title=f"Figure 3.3: {title}"))
    first = with_result[0]
    depth = first.get("depth", first.get("config.model.depth"))  # layers L-1 feeds the classifier
    history = client.job_metrics(first["job_id"], run_index=int(first["run_index"]),
                                 layer=None if depth is None else int(depth) - 1)
    if history:
        label = f"{figures._get(first, 'batch_norm', 'run row', default='?')} BN, " \
                f"wd {figures._get(first, 'weight_decay', 'run row', default='?')}"
        write("training_curves.png", figures.training_curves(history, title=f"Training curves: {title}, {label}"))
    for path in written.values():
        echo(f"wrote {path}")
    return written

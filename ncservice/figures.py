"""Figures of the thesis's experiments (matplotlib, Agg, PNG bytes) and the results CSV.

Everything here takes plain dicts: the JSON rows the service returns, so the same code renders figures in
``ncservice reproduce`` (client side) and could serve them from the API. No pyplot: every figure is a
``matplotlib.figure.Figure`` drawn on its own ``FigureCanvasAgg``, so nothing touches matplotlib's global
state (no backend switch, no open-figure registry).

Row formats
-----------
**Run row** (``fig31``, ``fig33(runs=...)``, ``results_csv``): one finished run, as in
``GET /sweeps/{id}/results?format=json`` (``rows``). A key may be given plain or under the dotted name the
service uses for the run's config:

============== =================================== ==========================================================
key            also accepted as                    meaning
============== =================================== ==========================================================
batch_norm     ``config.model.batch_norm``         ``affine`` | ``non_affine`` | ``none``
weight_decay   ``config.optim.weight_decay``       L2 coefficient lambda (> 0: plotted on a log axis)
seed           ``config.seed``                     run seed (optional; runs of one cell are averaged)
converged      (computed from ``train_accuracy``)   training accuracy reached 100% (thesis keeps only these)
intra_cos_min  --                                  min over classes of ``intra_c`` (thesis §2.2), last layer
inter_cos_max  --                                  max over class pairs of ``inter_cc'`` (thesis §2.2)
num_classes    ``config.data.num_classes``          C, for the ETF target ``-1/(C-1)``
effective_depth --                                 thesis Def. 3.2.2 (``None``: no layer reached eps)
status         --                                  job status; a row whose status is not ``succeeded`` has no
                                                   metrics and is listed as "no result" on the figure
============== =================================== ==========================================================

**Layer row** (``fig33``): the final measurement of one hidden layer of one run: ``weight_decay``, ``layer``
(1..L-1), ``ncc_accuracy``, ``intra_cos_min``, ``inter_cos_max`` (optional ``effective_depth``, ``seed``).

**History point** (``training_curves``): one measurement of one run during training: ``epoch``, ``layer``,
``train_loss``, ``train_accuracy``, ``intra_cos_min``, ``inter_cos_max``, ``nc1`` (optional ``run_index``,
``ncc_accuracy``). Points as served by ``GET /jobs/{id}/metrics`` (``{run_index, epoch, layer, metrics}``)
are accepted as they are: the ``metrics`` dict is merged into the point.

A required key that is missing raises ``ValueError`` naming the key and the row. ``None`` metric values
(non-finite numbers are stored as ``None`` by the service) are drawn as gaps.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: alternative (dotted, service) names of the run-row keys
ALIASES: dict[str, tuple[str, ...]] = {
    "batch_norm": ("config.model.batch_norm",),
    "weight_decay": ("config.optim.weight_decay",),
    "seed": ("config.seed",),
    "num_classes": ("config.data.num_classes",),
}

#: order in which batch-norm modes are drawn (others follow, sorted)
BN_ORDER = ("affine", "non_affine", "none")

#: leading CSV columns (those present in any row, in this order); every other key follows, sorted
CSV_LEADING = ("job_id", "run_index", "status", "batch_norm", "weight_decay", "seed", "converged",
               "train_accuracy", "train_loss", "intra_cos_min", "inter_cos_max", "nc1", "ncc_accuracy",
               "effective_depth", "num_classes")

DPI = 100

#: matplotlib's text layout (its mathtext parser, used for the log-axis tick labels by ``tight_layout`` and
#: by ``savefig``) is not thread-safe: two figures laid out at once in one process (the API serves figures
#: from a thread pool) fail with a ParseException. Every builder and every render holds this lock.
_MPL_LOCK = threading.RLock()


def _serialized(fn):
    """Run ``fn`` holding :data:`_MPL_LOCK`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _MPL_LOCK:
            return fn(*args, **kwargs)
    return wrapper


# ----------------------------------------------------------------------------------------------- rows

def flatten_point(point: Mapping[str, Any]) -> dict[str, Any]:
    """A history point in either form (flat, or the API's ``{run_index, epoch, layer, metrics}``) -> flat dict."""
    out = {k: v for k, v in point.items() if k != "metrics"}
    inner = point.get("metrics")
    if isinstance(inner, Mapping):
        out.update(inner)
    return out


def _get(row: Mapping[str, Any], key: str, where: str, *, default: Any = ...) -> Any:
    """``row[key]`` (or an alias of it); a missing key raises ValueError naming it (unless ``default``)."""
    if key in row:
        return row[key]
    for alias in ALIASES.get(key, ()):
        if alias in row:
            return row[alias]
    if default is not ...:
        return default
    names = " or ".join((repr(key), *(repr(a) for a in ALIASES.get(key, ()))))
    raise ValueError(f"{where}: missing key {names}")


def _num(value: Any) -> float:
    """A metric value as float; ``None`` (non-finite, stored as null) -> NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)


def _converged(row: Mapping[str, Any], where: str) -> bool:
    if "converged" in row and row["converged"] is not None:
        value = row["converged"]
        return value.lower() == "true" if isinstance(value, str) else bool(value)
    if row.get("train_accuracy") is not None:
        return _num(row["train_accuracy"]) == 1.0
    raise ValueError(f"{where}: missing key 'converged' (or 'train_accuracy' to derive it)")


def _has_result(row: Mapping[str, Any]) -> bool:
    status = row.get("status")
    return status is None or status == "succeeded"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _bn_sorted(modes: Iterable[str]) -> list[str]:
    modes = set(modes)
    return [m for m in BN_ORDER if m in modes] + sorted(m for m in modes if m not in BN_ORDER)


@_serialized
def _png(fig: Figure) -> bytes:
    """Render ``fig`` with the Agg canvas (no pyplot) and return the PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- figure 3.1

@_serialized
def build_fig31(rows: list[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Thesis Figure 3.1: last-layer min intra-class and max inter-class cosine vs weight decay.

    Two panels (min ``intra_cos``; max ``inter_cos`` with the simplex-ETF target ``-1/(C-1)``, thesis
    Lemma 2.4.4), log x axis, one line per batch-norm mode (runs of one (mode, weight decay) cell, e.g.
    several seeds, are averaged). Cells where some run did not reach 100% training accuracy stay on the line
    and are also marked with an ``x`` (one legend entry "not converged"): the thesis discards such runs, we
    show them. Runs without a result (status not ``succeeded``) are counted in a note, not plotted.

    Line2D objects carry a ``gid``: ``intra:<mode>``/``inter:<mode>`` (the lines),
    ``intra-nc:<mode>``/``inter-nc:<mode>`` (non-converged markers), ``etf`` (the target).

    Args:
        rows: run rows (module docstring).
        title: figure title; default "Figure 3.1 ...".

    Returns:
        A 12 x 4.8 inch ``Figure`` (1200 x 480 px as PNG).

    Raises:
        ValueError: no rows with results, or a row without a required key (named).
    """
    cells: dict[str, dict[float, list[tuple[float, float, bool]]]] = defaultdict(lambda: defaultdict(list))
    classes: set[int] = set()
    no_result = 0
    for i, row in enumerate(rows):
        where = f"row {i}"
        if not _has_result(row):
            no_result += 1
            continue
        bn = str(_get(row, "batch_norm", where))
        wd = float(_get(row, "weight_decay", where))
        intra = _num(_get(row, "intra_cos_min", where))
        inter = _num(_get(row, "inter_cos_max", where))
        cells[bn][wd].append((intra, inter, _converged(row, where)))
        c = _get(row, "num_classes", where, default=None)
        if c is not None:
            classes.add(int(c))
    if not cells:
        raise ValueError("fig31: no run with results among the rows")
    if len(classes) > 1:
        raise ValueError(f"fig31: runs with different num_classes {sorted(classes)}; one ETF target expected")

    fig = Figure(figsize=(12, 4.8), dpi=DPI)
    ax_intra, ax_inter = fig.subplots(1, 2)
    colors = {m: f"C{k}" for k, m in enumerate(_bn_sorted(cells))}
    nc_labelled = False
    for mode in _bn_sorted(cells):
        wds = sorted(cells[mode])
        intra = [_mean([r[0] for r in cells[mode][w]]) for w in wds]
        inter = [_mean([r[1] for r in cells[mode][w]]) for w in wds]
        bad = [k for k, w in enumerate(wds) if not all(r[2] for r in cells[mode][w])]
        for ax, ys, name in ((ax_intra, intra, "intra"), (ax_inter, inter, "inter")):
            ax.plot(wds, ys, marker="o", color=colors[mode], label=f"BN {mode}", gid=f"{name}:{mode}")
            if bad:
                label = "not converged (train acc < 100%)" if not nc_labelled and name == "inter" else None
                ax.plot([wds[k] for k in bad], [ys[k] for k in bad], linestyle="none", marker="x", markersize=11,
                        markeredgewidth=2, color="black", label=label, gid=f"{name}-nc:{mode}")
        if bad:
            nc_labelled = True
    if classes:
        C = classes.pop()
        ax_inter.axhline(-1.0 / (C - 1), color="gray", linestyle="--", label=f"ETF target -1/(C-1), C={C}",
                         gid="etf")
    ax_intra.set_ylabel("min intra-class cosine")
    ax_inter.set_ylabel("max inter-class cosine")
    for ax in (ax_intra, ax_inter):
        ax.set_xscale("log")
        ax.set_xlabel("weight decay")
        ax.grid(True, which="both", alpha=0.3)
    ax_intra.legend(loc="best", fontsize="small")
    ax_inter.legend(loc="best", fontsize="small")
    note = f" ({no_result} run(s) without result not plotted)" if no_result else ""
    fig.suptitle((title or "Figure 3.1: last-layer cosines vs weight decay") + note)
    fig.tight_layout()
    return fig


def fig31(rows: list[Mapping[str, Any]], *, title: str | None = None) -> bytes:
    """PNG bytes of :func:`build_fig31` (1200 x 480 px)."""
    return _png(build_fig31(rows, title=title))


# ----------------------------------------------------------------------------------------- figure 3.3

@_serialized
def build_fig33(rows_per_layer: list[Mapping[str, Any]], runs: list[Mapping[str, Any]] | None = None, *,
                title: str | None = None) -> Figure:
    """Thesis Figure 3.3: per-layer NC at the end of training, for each weight decay; effective depth.

    Four panels: NCC accuracy, min intra-class cosine and max inter-class cosine vs layer (one line per
    weight decay, seeds averaged; dashed, "(not converged)", where a run of that weight decay did not reach
    100% training accuracy, judged from ``runs`` when given, else from the layer rows' ``converged`` or
    ``train_accuracy`` when present), and effective depth (thesis Def. 3.2.2) vs weight decay (log x; mean
    over seeds of the runs that reached eps; a run where no layer did counts in a note).

    The effective depth comes from ``runs`` (run rows with ``weight_decay`` and ``effective_depth``) when
    given, else from the ``effective_depth`` key of the layer rows (one value per run, repeated per layer;
    with several seeds the layer rows must then carry ``seed``).

    Line2D ``gid``s: ``ncc:<wd>``, ``intra:<wd>``, ``inter:<wd>``, ``effective_depth``.

    Args:
        rows_per_layer: layer rows (module docstring).
        runs: optional run rows for the effective depth.
        title: figure title.

    Returns:
        A 13 x 9 inch ``Figure`` (1300 x 900 px as PNG).

    Raises:
        ValueError: no layer rows, or a row without a required key (named).
    """
    if not rows_per_layer:
        raise ValueError("fig33: no layer rows")
    cells: dict[float, dict[int, list[tuple[float, float, float]]]] = defaultdict(lambda: defaultdict(list))
    for i, row in enumerate(rows_per_layer):
        where = f"layer row {i}"
        wd = float(_get(row, "weight_decay", where))
        layer = int(_get(row, "layer", where))
        cells[wd][layer].append((_num(_get(row, "ncc_accuracy", where)), _num(_get(row, "intra_cos_min", where)),
                                 _num(_get(row, "inter_cos_max", where))))
    depth: dict[float, list[Any]] = defaultdict(list)
    if runs is not None:
        for i, row in enumerate(runs):
            if _has_result(row):
                depth[float(_get(row, "weight_decay", f"run row {i}"))].append(
                    _get(row, "effective_depth", f"run row {i}"))
    else:
        seen: set[tuple[Any, ...]] = set()
        for i, row in enumerate(rows_per_layer):
            wd = float(_get(row, "weight_decay", f"layer row {i}"))
            key = (wd, _get(row, "seed", f"layer row {i}", default=None), row.get("job_id"), row.get("run_index"))
            if key in seen:
                continue
            seen.add(key)
            depth[wd].append(_get(row, "effective_depth", f"layer row {i}"))

    # a weight decay with a run that did not reach 100% training accuracy is drawn dashed (thesis: such runs
    # are discarded; here they are shown, marked)
    unconverged: set[float] = set()
    for i, row in enumerate(runs if runs is not None else rows_per_layer):
        where = f"{'run' if runs is not None else 'layer'} row {i}"
        if _has_result(row) and ("converged" in row or row.get("train_accuracy") is not None) \
                and not _converged(row, where):
            unconverged.add(float(_get(row, "weight_decay", where)))

    fig = Figure(figsize=(13, 9), dpi=DPI)
    axes = fig.subplots(2, 2)
    panels = ((axes[0, 0], 0, "ncc", "NCC accuracy"), (axes[0, 1], 1, "intra", "min intra-class cosine"),
              (axes[1, 0], 2, "inter", "max inter-class cosine"))
    for k, wd in enumerate(sorted(cells)):
        layers = sorted(cells[wd])
        label, style = (f"wd {wd:g} (not converged)", "--") if wd in unconverged else (f"wd {wd:g}", "-")
        for ax, j, name, _ in panels:
            ys = [_mean([r[j] for r in cells[wd][layer]]) for layer in layers]
            ax.plot(layers, ys, marker=".", linestyle=style, color=f"C{k % 10}", label=label, gid=f"{name}:{wd:g}")
    for ax, _, _, label in panels:
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize="small", ncol=2)
    ax_d = axes[1, 1]
    wds = sorted(depth)
    missing = sum(1 for w in wds for v in depth[w] if v is None)
    ys = [_mean([_num(v) for v in depth[w] if v is not None]) for w in wds]
    ax_d.plot(wds, ys, marker="o", color="black", gid="effective_depth")
    ax_d.set_xscale("log")
    ax_d.set_xlabel("weight decay")
    ax_d.set_ylabel("effective depth (layers)")
    ax_d.yaxis.set_major_locator(MaxNLocator(integer=True))  # a number of layers
    ax_d.set_ylim(0, max(max(cells[w]) for w in cells) + 0.5)  # up to the deepest measured layer
    ax_d.grid(True, which="both", alpha=0.3)
    if missing:
        ax_d.set_title(f"{missing} run(s): no layer reached eps (not plotted)", fontsize="small")
    fig.suptitle(title or "Figure 3.3: per-layer NC at the end of training")
    fig.tight_layout()
    return fig


def fig33(rows_per_layer: list[Mapping[str, Any]], runs: list[Mapping[str, Any]] | None = None, *,
          title: str | None = None) -> bytes:
    """PNG bytes of :func:`build_fig33` (1300 x 900 px)."""
    return _png(build_fig33(rows_per_layer, runs, title=title))


# ------------------------------------------------------------------------------------ training curves

@_serialized
def build_training_curves(history: list[Mapping[str, Any]], *, layer: int | None = None, run_index: int = 0,
                          title: str | None = None) -> Figure:
    """Training curves of one run: loss, accuracy, intra/inter cosine and NC1 vs epoch.

    Four panels: ``train_loss``; ``train_accuracy``; ``intra_cos_min`` and ``inter_cos_max``; ``nc1``
    (log y when all positive). Line2D ``gid``s: ``train_loss``, ``train_accuracy``, ``intra_cos_min``,
    ``inter_cos_max``, ``nc1``.

    Args:
        history: history points (module docstring), flat or as served by ``GET /jobs/{id}/metrics``.
        layer: the layer to draw; default the deepest layer present (the features feeding the classifier).
        run_index: the run of a bundle job to draw (points without ``run_index`` count as run 0).
        title: figure title.

    Returns:
        A 12 x 8 inch ``Figure`` (1200 x 800 px as PNG).

    Raises:
        ValueError: no point of that run/layer, or a point without a required key (named).
    """
    points = [flatten_point(p) for p in history]
    points = [p for p in points if int(p.get("run_index", 0) or 0) == run_index]
    for i, p in enumerate(points):
        _get(p, "epoch", f"history point {i}")
    if layer is None:
        layers = [int(p["layer"]) for p in points if p.get("layer") is not None]
        layer = max(layers) if layers else None
    if layer is not None:
        points = [p for p in points if p.get("layer") is None or int(p["layer"]) == layer]
    if not points:
        raise ValueError(f"training_curves: no history point for run_index={run_index}, layer={layer}")
    points.sort(key=lambda p: int(p["epoch"]))
    epochs = [int(p["epoch"]) for p in points]

    def series(key: str) -> list[float]:
        return [_num(_get(p, key, f"history point at epoch {p['epoch']}")) for p in points]

    fig = Figure(figsize=(12, 8), dpi=DPI)
    axes = fig.subplots(2, 2)
    axes[0, 0].plot(epochs, series("train_loss"), marker=".", gid="train_loss")
    axes[0, 0].set_ylabel("training loss")
    axes[0, 1].plot(epochs, series("train_accuracy"), marker=".", gid="train_accuracy")
    axes[0, 1].set_ylabel("training accuracy")
    ax = axes[1, 0]
    ax.plot(epochs, series("intra_cos_min"), marker=".", label="min intra-class cosine", gid="intra_cos_min")
    ax.plot(epochs, series("inter_cos_max"), marker=".", label="max inter-class cosine", gid="inter_cos_max")
    ax.set_ylabel("cosine")
    ax.legend(loc="best", fontsize="small")
    nc1 = series("nc1")
    axes[1, 1].plot(epochs, nc1, marker=".", gid="nc1")
    axes[1, 1].set_ylabel("NC1 = Tr(Sigma_W pinv(Sigma_B)) / C")
    if all(v > 0 for v in nc1 if not math.isnan(v)) and any(not math.isnan(v) for v in nc1):
        axes[1, 1].set_yscale("log")
    for a in axes.flat:
        a.set_xlabel("epoch")
        a.grid(True, alpha=0.3)
    where = f"layer {layer}" if layer is not None else "last layer"
    fig.suptitle(title or f"Training curves (run {run_index}, {where})")
    fig.tight_layout()
    return fig


def training_curves(history: list[Mapping[str, Any]], *, layer: int | None = None, run_index: int = 0,
                    title: str | None = None) -> bytes:
    """PNG bytes of :func:`build_training_curves` (1200 x 800 px)."""
    return _png(build_training_curves(history, layer=layer, run_index=run_index, title=title))


# ------------------------------------------------------------------------------------------------ CSV

def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join("" if v is None else str(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def results_csv(rows: list[Mapping[str, Any]]) -> str:
    """One CSV line per run (header first), columns in a stable order.

    The columns of :data:`CSV_LEADING` present in any row come first, in that order, then every other key of
    any row, sorted. Missing values and ``None``/non-finite numbers are empty cells, lists are joined by
    ``;`` and dicts are compact JSON. Plain names (``batch_norm``) are filled from their dotted aliases
    (``config.model.batch_norm``) so the leading columns are always the readable ones.
    """
    flat: list[dict[str, Any]] = []
    for row in rows:
        r = dict(row)
        for key, aliases in ALIASES.items():
            if key not in r:
                for a in aliases:
                    if a in r:
                        r[key] = r[a]
                        break
        flat.append(r)
    keys = {k for r in flat for k in r}
    columns = [k for k in CSV_LEADING if k in keys] + sorted(keys - set(CSV_LEADING))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in flat:
        writer.writerow({k: _cell(r.get(k)) for k in columns})
    return buf.getvalue()

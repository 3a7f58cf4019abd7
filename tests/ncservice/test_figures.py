"""ncservice.figures on synthetic rows: PNGs decode at the documented size, the right lines/points are drawn."""

from __future__ import annotations

import csv
import io

import matplotlib.image as mpimg
import numpy as np
import pytest

from ncservice import figures

WDS = [1e-4, 1e-3, 3e-3, 1e-2]
MODES = ["affine", "non_affine", "none"]


def _run_rows(seeds=(0,)):
    """Service-shaped rows (dotted config keys); 'none' does not converge at the two largest decays."""
    rows = []
    for m, mode in enumerate(MODES):
        for k, wd in enumerate(WDS):
            for s in seeds:
                conv = not (mode == "none" and wd >= 3e-3)
                rows.append({"job_id": f"j{m}", "run_index": k, "status": "succeeded",
                             "config.model.batch_norm": mode, "config.optim.weight_decay": wd, "config.seed": s,
                             "train_accuracy": 1.0 if conv else 0.9, "converged": conv, "num_classes": 10,
                             "intra_cos_min": 0.5 + 0.1 * k + 0.01 * s, "inter_cos_max": 0.2 - 0.05 * k - m * 0.01,
                             "effective_depth": 5 - k, "nc1": [0.1, 0.2] if s else None})
    return rows


def _lines(fig):
    return {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines()}


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(png), format="png")


def test_fig31_lines_points_markers_and_etf_target():
    rows = _run_rows(seeds=(0, 1)) + [{"status": "failed", "config.model.batch_norm": "affine"}]
    fig = figures.build_fig31(rows)
    lines = _lines(fig)
    for mode in MODES:
        for panel in ("intra", "inter"):
            ln = lines[f"{panel}:{mode}"]
            np.testing.assert_allclose(ln.get_xdata(), WDS)
    # seeds 0 and 1 averaged: intra = 0.5 + 0.1 k + 0.005
    np.testing.assert_allclose(lines["intra:affine"].get_ydata(), [0.505, 0.605, 0.705, 0.805])
    np.testing.assert_allclose(lines["inter:none"].get_ydata(), [0.18, 0.13, 0.08, 0.03])
    # the two non-converged cells of 'none' are marked (not dropped), on both panels, with an 'x'
    for panel in ("intra", "inter"):
        nc = lines[f"{panel}-nc:none"]
        np.testing.assert_allclose(nc.get_xdata(), [3e-3, 1e-2])
        assert nc.get_marker() == "x" and nc.get_linestyle() == "None"
    assert not any(g.endswith("-nc:affine") or g.endswith("-nc:non_affine") for g in lines)
    np.testing.assert_allclose(lines["etf"].get_ydata(), [-1 / 9, -1 / 9])
    assert len(lines) == 2 * 3 + 2 + 1
    labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any("not converged" in t for t in labels) and any("ETF" in t for t in labels)
    assert fig.axes[0].get_xscale() == "log"
    assert "1 run(s) without result" in fig._suptitle.get_text()


def test_fig31_png_decodes_with_expected_size():
    img = _decode(figures.fig31(_run_rows()))
    assert img.shape[:2] == (480, 1200)
    assert img[..., :3].std() > 0.01  # something was drawn


def test_fig31_missing_key_is_named():
    rows = _run_rows()
    del rows[3]["intra_cos_min"]
    with pytest.raises(ValueError, match="row 3.*'intra_cos_min'"):
        figures.fig31(rows)
    rows = _run_rows()
    del rows[0]["config.optim.weight_decay"]
    with pytest.raises(ValueError, match="'weight_decay' or 'config.optim.weight_decay'"):
        figures.build_fig31(rows)
    with pytest.raises(ValueError, match="no run with results"):
        figures.build_fig31([{"status": "failed"}])


def test_fig31_plain_keys_and_converged_from_accuracy():
    rows = [{"batch_norm": "affine", "weight_decay": wd, "train_accuracy": acc, "intra_cos_min": 0.9,
             "inter_cos_max": -0.1, "num_classes": 4} for wd, acc in ((1e-4, 1.0), (1e-3, 0.99))]
    lines = _lines(figures.build_fig31(rows))
    np.testing.assert_allclose(lines["inter-nc:affine"].get_xdata(), [1e-3])
    np.testing.assert_allclose(lines["etf"].get_ydata(), [-1 / 3, -1 / 3])


def _layer_rows(depth=5):
    rows = []
    for k, wd in enumerate(WDS):
        for layer in range(1, depth):
            rows.append({"weight_decay": wd, "layer": layer, "seed": 0, "ncc_accuracy": layer / depth,
                         "intra_cos_min": 0.1 * layer + k * 0.01, "inter_cos_max": -0.01 * layer,
                         "effective_depth": None if k == 0 else depth - k})
    return rows


def test_fig33_lines_per_weight_decay_and_effective_depth():
    fig = figures.build_fig33(_layer_rows())
    lines = _lines(fig)
    assert len(lines) == 3 * len(WDS) + 1
    for wd in WDS:
        for name in ("ncc", "intra", "inter"):
            assert list(lines[f"{name}:{wd:g}"].get_xdata()) == [1, 2, 3, 4]
    np.testing.assert_allclose(lines["intra:0.001"].get_ydata(), [0.11, 0.21, 0.31, 0.41])
    ed = lines["effective_depth"]
    np.testing.assert_allclose(ed.get_xdata(), WDS)
    np.testing.assert_allclose(ed.get_ydata(), [np.nan, 4, 3, 2])
    assert "1 run(s)" in fig.axes[3].get_title()


def test_fig33_effective_depth_from_run_rows_and_png():
    runs = [r for r in _run_rows(seeds=(0, 1)) if r["config.model.batch_norm"] == "affine"]
    lines = _lines(figures.build_fig33(_layer_rows(), runs))
    np.testing.assert_allclose(lines["effective_depth"].get_ydata(), [5, 4, 3, 2])
    img = _decode(figures.fig33(_layer_rows(), runs))
    assert img.shape[:2] == (900, 1300)
    bad = _layer_rows()
    del bad[2]["ncc_accuracy"]
    with pytest.raises(ValueError, match="layer row 2.*'ncc_accuracy'"):
        figures.fig33(bad)


def test_fig33_marks_unconverged_weight_decays_and_integer_depth_axis():
    runs = [{"weight_decay": wd, "effective_depth": 3, "train_accuracy": acc, "status": "succeeded"}
            for wd, acc in zip(WDS, (1.0, 1.0, 0.9999, 0.1))]
    fig = figures.build_fig33(_layer_rows(), runs)
    lines = _lines(fig)
    for wd, dashed in zip(WDS, (False, False, True, True)):
        assert lines[f"intra:{wd:g}"].get_linestyle() == ("--" if dashed else "-")
        assert lines[f"ncc:{wd:g}"].get_label().endswith("(not converged)") == dashed
    ax = fig.axes[3]
    assert ax.get_ylim() == (0.0, 4.5)  # 0 .. deepest measured layer (4)
    assert all(float(t).is_integer() for t in ax.get_yticks())
    # without run rows, the layer rows' train_accuracy decides; without either, every line is solid
    rows = [dict(r, train_accuracy=0.5 if r["weight_decay"] == WDS[0] else 1.0) for r in _layer_rows()]
    assert _lines(figures.build_fig33(rows))[f"inter:{WDS[0]:g}"].get_linestyle() == "--"
    assert {ln.get_linestyle() for ln in _lines(figures.build_fig33(_layer_rows())).values()} == {"-"}


def test_training_curves_from_api_points():
    history = []
    for epoch in (10, 20, 30):
        for layer in (1, 2, 3):
            history.append({"run_index": 0, "epoch": epoch, "layer": layer, "metrics": {
                "train_loss": 1.0 / epoch, "train_accuracy": min(1.0, epoch / 20), "intra_cos_min": layer * 0.1,
                "inter_cos_max": -layer * 0.01, "nc1": 10.0 / epoch, "ncc_accuracy": 1.0}})
    history.append({"run_index": 1, "epoch": 10, "layer": 3, "metrics": {}})  # another run: ignored
    fig = figures.build_training_curves(list(reversed(history)))
    lines = _lines(fig)
    assert set(lines) == {"train_loss", "train_accuracy", "intra_cos_min", "inter_cos_max", "nc1"}
    for ln in lines.values():
        assert list(ln.get_xdata()) == [10, 20, 30]
    np.testing.assert_allclose(lines["intra_cos_min"].get_ydata(), [0.3, 0.3, 0.3])  # deepest layer (3)
    np.testing.assert_allclose(lines["nc1"].get_ydata(), [1.0, 0.5, 1 / 3])
    assert fig.axes[3].get_yscale() == "log"
    layer1 = _lines(figures.build_training_curves(history, layer=1))
    np.testing.assert_allclose(layer1["intra_cos_min"].get_ydata(), [0.1, 0.1, 0.1])
    assert _decode(figures.training_curves(history)).shape[:2] == (800, 1200)
    with pytest.raises(ValueError, match="'nc1'"):
        figures.training_curves([{"epoch": 1, "train_loss": 1, "train_accuracy": 0.5, "intra_cos_min": 0.1,
                                  "inter_cos_max": 0.1}])
    with pytest.raises(ValueError, match="no history point"):
        figures.training_curves(history, run_index=5)


def test_results_csv_one_row_per_run_stable_columns():
    rows = _run_rows(seeds=(0, 1))
    text = figures.results_csv(rows)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(rows) == 24
    header = text.splitlines()[0].split(",")
    assert header[:9] == ["job_id", "run_index", "status", "batch_norm", "weight_decay", "seed", "converged",
                          "train_accuracy", "intra_cos_min"]
    rest = header[9:]
    assert rest[:3] == ["inter_cos_max", "nc1", "effective_depth"]
    assert rest[4:] == sorted(rest[4:])
    assert parsed[0]["batch_norm"] == "affine" and float(parsed[0]["weight_decay"]) == 1e-4
    assert parsed[0]["nc1"] == "" and parsed[1]["nc1"] == "0.1;0.2"
    # the same rows shuffled give the same columns
    assert figures.results_csv(list(reversed(rows))).splitlines()[0] == text.splitlines()[0]


def test_figures_drawn_from_many_threads_at_once():
    """The API renders figures in a thread pool; matplotlib's text layout is not thread-safe (CI saw a
    ParseException from two figures of one sweep page drawn at once). Concurrent draws succeed and give the
    same bytes as a draw on its own."""
    from concurrent.futures import ThreadPoolExecutor

    rows = _run_rows()
    alone = figures.fig31(rows, title="t")
    with ThreadPoolExecutor(8) as pool:
        pngs = list(pool.map(lambda _: figures.fig31(rows, title="t"), range(32)))
    assert all(p == alone for p in pngs)

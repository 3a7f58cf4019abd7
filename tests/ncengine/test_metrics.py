"""Tests for ncengine.metrics.measure against a slow, obviously correct float64 reference (defined below).

The reference uses explicit per-class loops, explicit N^2 pairwise cosines, the full d x d within-class covariance,
an explicit rank-(C-1) pseudo-inverse from ``eigh`` and explicit NCC distances; nothing is shared with ncengine.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ncengine.errors import InputError
from ncengine.metrics import effective_depth, measure

# ----------------------------------------------------------------------------------------- reference


def _nc2(X: np.ndarray) -> dict[str, float]:
    C = X.shape[0]
    norms = np.array([math.sqrt(sum(v * v for v in row)) for row in X])
    cos = [float(X[i] @ X[j] / (norms[i] * norms[j])) for i in range(C) for j in range(C) if i != j]
    cos = np.array(cos)
    G = X @ X.T
    P = np.eye(C) - 1.0 / C
    return {
        "equinorm": float(np.sqrt(np.mean((norms - norms.mean()) ** 2)) / norms.mean()),
        "equiangularity": float(np.sqrt(np.mean((cos - cos.mean()) ** 2))),
        "max_angle": float(np.mean(np.abs(cos + 1.0 / (C - 1)))),
        "etf_distance": float(np.sqrt(np.sum((G / np.sqrt(np.sum(G * G)) - P / np.sqrt(np.sum(P * P))) ** 2))),
    }


def reference(H, y, W=None, b=None, *, C=None, center="none", global_mean="class_mean", test=None) -> dict:
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y)
    N, d = H.shape
    C = int(C if C is not None else y.max() + 1)
    idx = [np.flatnonzero(y == c) for c in range(C)]
    n = np.array([len(i) for i in idx], dtype=np.float64)
    mu = np.stack([H[i].sum(0) / len(i) for i in idx])
    muG = mu.mean(0) if global_mean == "class_mean" else H.mean(0)
    M = mu - muG
    out: dict = {"num_classes": C, "num_samples": N, "dim": d, "class_counts": n.astype(int)}

    # NC1: full covariance and an explicit rank-(C-1) pseudo-inverse
    SW = np.zeros((d, d))
    for c in range(C):
        D = H[idx[c]] - mu[c]
        for row in D:
            SW += np.outer(row, row)
    SW /= N
    SB = M.T @ M / C
    lam, V = np.linalg.eigh(SB)
    order = np.argsort(lam)[::-1][: min(C - 1, d)]
    pinv = V[:, order] @ np.diag(1.0 / lam[order]) @ V[:, order].T
    out["nc1"] = float(np.trace(SW @ pinv) / C)
    out["nc1_trace_ratio"] = float(np.trace(SW) / np.trace(SB))

    # CDNV (Galanti et al. 2022)
    var = np.array([np.mean(np.sum((H[idx[c]] - mu[c]) ** 2, axis=1)) for c in range(C)])
    vals = [(var[c] + var[k]) / (2 * np.sum((mu[c] - mu[k]) ** 2)) for c in range(C) for k in range(c + 1, C)]
    out["cdnv_mean"] = float(np.mean(vals))

    # cosines: explicit N^2 pairs, zero-norm rows left out
    X = H - muG if center == "global_mean" else H
    norms = np.sqrt(np.sum(X * X, axis=1))
    keep = norms > 0
    out["zero_norm_count"] = int((~keep).sum())
    Xn = np.zeros_like(X)
    Xn[keep] = X[keep] / norms[keep, None]
    sets = [np.flatnonzero((y == c) & keep) for c in range(C)]
    inter = np.zeros((C, C))
    for c in range(C):
        for k in range(C):
            pair = Xn[sets[c]] @ Xn[sets[k]].T  # every (i, j) pair, i = j included
            inter[c, k] = pair.mean()
    out["intra_cos"] = np.diagonal(inter).copy()
    out["inter_cos"] = inter
    off = inter[~np.eye(C, dtype=bool)]
    out["intra_cos_min"], out["intra_cos_mean"] = float(out["intra_cos"].min()), float(out["intra_cos"].mean())
    out["inter_cos_max"], out["inter_cos_mean"] = float(off.max()), float(off.mean())

    for k, v in _nc2(M).items():
        out[f"nc2_{k}"] = v

    # NCC: explicit distances
    dist = np.array([[np.sum((h - mu[c]) ** 2) for c in range(C)] for h in H])
    ncc = dist.argmin(1)
    out["ncc_accuracy"] = float(np.mean(ncc == y))
    ref_mu = M if center == "global_mean" else mu
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero row has no cosine: it never wins the argmax
        cosm = np.array([[float(x @ m) / (np.linalg.norm(x) * np.linalg.norm(m)) for m in ref_mu] for x in X])
    cosm = np.nan_to_num(cosm, nan=-np.inf)
    out["ncc_cos_accuracy"] = float(np.mean(cosm.argmax(1) == y))

    if W is not None:
        W = np.asarray(W, dtype=np.float64)
        for k, v in _nc2(W).items():
            out[f"nc2_w_{k}"] = v
        out["nc3_self_duality"] = float(np.sum((W / np.linalg.norm(W) - M / np.linalg.norm(M)) ** 2))
        out["nc3_cos"] = np.array([W[c] @ M[c] / (np.linalg.norm(W[c]) * np.linalg.norm(M[c])) for c in range(C)])
        Wc = W - W.mean(0)
        out["nc3_cos_thesis"] = np.array([Wc[c] @ mu[c] / (np.linalg.norm(Wc[c]) * np.linalg.norm(mu[c]))
                                          for c in range(C)])
        bb = np.zeros(C) if b is None else np.asarray(b, dtype=np.float64)
        logits = H @ W.T + bb
        ce = np.array([math.log(sum(math.exp(v - row.max()) for v in row)) + row.max() - row[t]
                       for row, t in zip(logits, y)])
        out["loss"] = float(np.mean([ce[i].mean() for i in idx]))  # class-balanced
        pred = logits.argmax(1)
        out["classifier_accuracy"] = float(np.mean(pred == y))
        out["ncc_agreement"] = float(np.mean(pred == ncc))
        sq = np.sum(H * H, axis=1) + (0.0 if b is None else 1.0)
        out["alpha"] = math.sqrt(np.mean([sq[i].mean() for i in idx]))
        out["beta"] = math.sqrt((np.sum(W * W) + np.sum(bb * bb)) / C)
        ab = out["alpha"] * out["beta"]
        out["min_loss_m"] = math.log(1 + (C - 1) * math.exp(-C / (C - 1) * ab))
        out["epsilon"] = out["loss"] - out["min_loss_m"]

    if test is not None:
        Ht, yt = np.asarray(test[0], dtype=np.float64), np.asarray(test[1])
        dt = np.array([[np.sum((h - mu[c]) ** 2) for c in range(C)] for h in Ht])
        nt = dt.argmin(1)
        out["test_ncc_accuracy"] = float(np.mean(nt == yt))
        if W is not None:
            pt = (Ht @ W.T + bb).argmax(1)
            out["test_classifier_accuracy"] = float(np.mean(pt == yt))
            out["test_ncc_agreement"] = float(np.mean(pt == nt))
    return out


# ----------------------------------------------------------------------------------------- data


def make_data(N, d, C, *, seed=0, imbalanced=False, spread=2.0, noise=1.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    if imbalanced:
        p = rng.dirichlet(np.ones(C) * 0.7)
        y = rng.choice(C, size=N, p=p)
    else:
        y = rng.integers(0, C, size=N)
    y[:C] = np.arange(C)  # every class occurs
    rng.shuffle(y)
    centers = spread * rng.normal(size=(C, d)) + 0.5  # an offset so the raw and centred cosines differ
    H = (centers[y] + noise * rng.normal(size=(N, d))).astype(dtype)
    W = rng.normal(size=(C, d))
    b = rng.normal(size=C)
    return H, y, W, b


SCALAR_KEYS = ["nc1", "nc1_trace_ratio", "cdnv_mean", "intra_cos_min", "intra_cos_mean", "inter_cos_max",
               "inter_cos_mean", "nc2_equinorm", "nc2_equiangularity", "nc2_max_angle", "nc2_etf_distance",
               "ncc_accuracy", "ncc_cos_accuracy", "zero_norm_count", "num_samples", "num_classes", "dim"]
W_KEYS = ["nc2_w_equinorm", "nc2_w_equiangularity", "nc2_w_max_angle", "nc2_w_etf_distance", "nc3_self_duality",
          "loss", "alpha", "beta", "min_loss_m", "epsilon", "classifier_accuracy", "ncc_agreement"]
ARRAY_KEYS = ["intra_cos", "inter_cos", "class_counts"]
W_ARRAY_KEYS = ["nc3_cos", "nc3_cos_thesis"]


def assert_matches(got: dict, want: dict, keys, rtol=1e-9, atol=1e-12):
    for k in keys:
        np.testing.assert_allclose(np.asarray(got[k], dtype=np.float64), np.asarray(want[k], dtype=np.float64),
                                   rtol=rtol, atol=atol, err_msg=k)


# ----------------------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize(
    "N,d,C,chunk,imbalanced,center,gmean,use_bias",
    [
        (97, 7, 3, 10, False, "none", "class_mean", False),
        (150, 12, 5, 33, True, "none", "class_mean", True),
        (160, 4, 8, 1000, True, "global_mean", "sample", False),  # d < C - 1: NC1 on a rank-d range
        (120, 20, 6, 7, False, "global_mean", "class_mean", True),
    ],
)
def test_every_metric_matches_slow_reference(N, d, C, chunk, imbalanced, center, gmean, use_bias):
    H, y, W, b = make_data(N, d, C, seed=N + d + C, imbalanced=imbalanced)
    bias = b if use_bias else None
    got = measure(H, y, W, bias, chunk_size=chunk, center=center, global_mean=gmean).to_dict()
    want = reference(H, y, W, bias, center=center, global_mean=gmean)
    assert_matches(got, want, SCALAR_KEYS + W_KEYS + ARRAY_KEYS + W_ARRAY_KEYS)
    assert got["nc1_rank"] == min(C - 1, d)
    json.dumps(got, allow_nan=False)


def test_without_weights_has_no_classifier_keys():
    H, y, _, _ = make_data(60, 5, 3)
    got = measure(H, y).to_dict()
    for k in W_KEYS + W_ARRAY_KEYS + ["bounds"]:
        assert k not in got
    assert_matches(got, reference(H, y), SCALAR_KEYS + ARRAY_KEYS)


def test_float16_and_bfloat16_inputs_are_accumulated_in_float64():
    H, y, W, _ = make_data(130, 9, 4, seed=3)
    H16 = H.astype(np.float16)
    got = measure(H16, y, W, chunk_size=17).to_dict()
    assert_matches(got, reference(H16.astype(np.float64), y, W), SCALAR_KEYS + W_KEYS + ARRAY_KEYS)
    Hb = torch.from_numpy(H).to(torch.bfloat16)
    got_b = measure(Hb, torch.from_numpy(y), torch.from_numpy(W), chunk_size=50).to_dict()
    assert_matches(got_b, reference(Hb.to(torch.float64).numpy(), y, W), SCALAR_KEYS + W_KEYS + ARRAY_KEYS)


def test_held_out_split_uses_training_means():
    H, y, W, b = make_data(120, 6, 4, seed=5, noise=2.0)
    Ht, yt, _, _ = make_data(70, 6, 4, seed=5, noise=2.5)  # same seed -> same centres
    got = measure(H, y, W, b, test_features=Ht, test_labels=yt, chunk_size=31).to_dict()
    want = reference(H, y, W, b, test=(Ht, yt))
    assert_matches(got, want, ["test_ncc_accuracy", "test_classifier_accuracy", "test_ncc_agreement"])
    assert got["test_num_samples"] == 70


# ----------------------------------------------------------------------------------------- closed forms


def simplex_etf(C: int, d: int, scale: float = 3.0) -> np.ndarray:
    """Rows of a (C, d) simplex ETF: sqrt(C/(C-1)) (I - 11^T/C), embedded in d dims, rotated."""
    E = np.sqrt(C / (C - 1)) * (np.eye(C) - np.ones((C, C)) / C)
    Q, _ = np.linalg.qr(np.random.default_rng(C).normal(size=(d, d)))
    return scale * np.pad(E, ((0, 0), (0, d - C))) @ Q


@pytest.mark.parametrize("C,d", [(2, 3), (4, 6), (10, 12)])
def test_exact_simplex_etf_closed_form(C, d):
    mu = simplex_etf(C, d)
    y = np.repeat(np.arange(C), [3 + c for c in range(C)])  # imbalanced, no within-class noise
    H = mu[y]
    got = measure(H, y, mu, chunk_size=5).to_dict()  # W = M (mu_G = 0)
    np.testing.assert_allclose(got["intra_cos"], 1.0, atol=1e-12)
    off = np.asarray(got["inter_cos"])[~np.eye(C, dtype=bool)]
    np.testing.assert_allclose(off, -1.0 / (C - 1), atol=1e-12)
    assert got["nc1"] == pytest.approx(0.0, abs=1e-20)
    assert got["nc1_trace_ratio"] == pytest.approx(0.0, abs=1e-20)
    assert got["nc2_etf_distance"] == pytest.approx(0.0, abs=1e-12)
    assert got["nc2_equinorm"] == pytest.approx(0.0, abs=1e-12)
    assert got["nc2_max_angle"] == pytest.approx(0.0, abs=1e-12)
    assert got["ncc_accuracy"] == 1.0
    assert got["nc3_self_duality"] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(got["nc3_cos"], 1.0, atol=1e-12)
    assert got["classifier_accuracy"] == 1.0 and got["ncc_agreement"] == 1.0
    # the optimum of Theorem 2.3.1: the loss of an ETF with W = M equals m(alpha, beta)
    assert got["epsilon"] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------- loss >= m


@settings(max_examples=40, deadline=None)
@given(
    C=st.integers(2, 6),
    d=st.integers(1, 6),
    extra=st.integers(0, 12),
    scale_h=st.floats(1e-3, 30.0),
    scale_w=st.floats(1e-3, 30.0),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_loss_is_at_least_min_loss_m(C, d, extra, scale_h, scale_w, use_bias, seed):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(C), rng.integers(0, C, size=extra)])  # imbalanced in general
    H = scale_h * rng.normal(size=(len(y), d))
    W = scale_w * rng.normal(size=(C, d))
    b = scale_w * rng.normal(size=C) if use_bias else None
    got = measure(H, y, W, b).to_dict()  # also runs the runtime self-check
    want = reference(H, y, W, b)
    assert got["loss"] >= got["min_loss_m"] - 1e-12
    assert_matches(got, want, ["loss", "alpha", "beta", "min_loss_m"], rtol=1e-9)


# ----------------------------------------------------------------------------------------- streaming


def test_array_memmap_and_chunk_iterator_agree(tmp_path):
    H, y, W, b = make_data(333, 10, 7, seed=11, imbalanced=True, dtype=np.float32)
    path = tmp_path / "h.npy"
    np.save(path, H)
    mm = np.load(path, mmap_mode="r")

    def chunks():
        for a in range(0, len(y), 41):
            yield H[a:a + 41], y[a:a + 41]

    kw = dict(weights=W, bias=b, test_features=H[:50], test_labels=y[:50])
    whole = measure(H, y, chunk_size=10**6, **kw).to_dict()
    mapped = measure(mm, y, chunk_size=29, **kw).to_dict()
    streamed = measure(chunks, None, chunk_size=13, **kw).to_dict()
    tensor = measure(torch.from_numpy(H), torch.from_numpy(y), device="cpu", **kw).to_dict()
    for other in (mapped, streamed, tensor):
        assert other.keys() == whole.keys()
        for k, v in whole.items():
            if k == "bounds":
                continue
            np.testing.assert_allclose(np.asarray(other[k], dtype=float), np.asarray(v, dtype=float), rtol=1e-12,
                                       atol=1e-14, err_msg=k)


def test_streaming_with_remapped_sparse_ids():
    H, y, _, _ = make_data(200, 5, 4, seed=2)
    ids = np.array([-7, 3, 40, 1000])
    ys = ids[y]

    def chunks():
        for a in range(0, 200, 37):
            yield H[a:a + 37], ys[a:a + 37]

    got = measure(chunks, None, remap_labels=True, num_classes=4).to_dict()
    direct = measure(H, ys, remap_labels=True).to_dict()
    want = reference(H, y)
    assert got["label_ids"] == ids.tolist() == direct["label_ids"]
    assert_matches(got, want, SCALAR_KEYS + ARRAY_KEYS)
    assert_matches(direct, want, SCALAR_KEYS + ARRAY_KEYS)


# ----------------------------------------------------------------------------------------- conventions


def test_zero_norm_rows_are_counted_and_left_out_of_cosines():
    H, y, _, _ = make_data(90, 6, 3, seed=4)
    H[[5, 17, 40]] = 0.0
    got = measure(H, y).to_dict()
    want = reference(H, y)
    assert got["zero_norm_count"] == 3
    assert_matches(got, want, ["intra_cos", "inter_cos", "nc1", "ncc_accuracy"])


def test_intra_cos_includes_the_diagonal_pairs():
    # two unit vectors at 90 degrees in one class: mean over all 4 (i, j) pairs is (1 + 0 + 0 + 1) / 4 = 0.5
    H = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, -0.1]])
    y = np.array([0, 0, 1, 1])
    got = measure(H, y).to_dict()
    assert got["intra_cos"][0] == pytest.approx(0.5, abs=1e-15)


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "mutate,field,needle",
    [
        (lambda H, y, W: (H, np.eye(3)[y], W), "labels", "one-hot"),
        (lambda H, y, W: (H, y[:-1], W), "labels", "entries"),
        (lambda H, y, W: (H.T, y, W), "labels", "transposed"),
        (lambda H, y, W: (H, y.astype(float), W), "labels", "integer"),
        (lambda H, y, W: (H, np.where(y == 0, -1, y), W), "labels", "negative"),
        (lambda H, y, W: (H, np.where(y == 1, 0, y), W), "labels", "[1]"),
        (lambda H, y, W: (H, y + 1, W), "labels", "remap_labels"),
        (lambda H, y, W: (H, np.zeros_like(y), W[:1]), "labels", "class"),
        (lambda H, y, W: (np.where(np.arange(len(y))[:, None] % 10 == 3, np.nan, H), y, W), "features", "6 row"),
        (lambda H, y, W: (H[:, :, None], y, W), "features", "shape"),
        (lambda H, y, W: (H, y, W[:, :-1]), "weights", "shape"),
        (lambda H, y, W: (H, y, W.T), "weights", "transposed"),
    ],
)
def test_bad_input_names_the_field(mutate, field, needle):
    H, y, W, _ = make_data(60, 4, 3, seed=9)
    H2, y2, W2 = mutate(H, y, W)
    with pytest.raises(InputError) as ei:
        measure(H2, y2, W2)
    assert ei.value.field == field
    assert needle in str(ei.value)


def test_num_classes_larger_than_labels_is_an_error_naming_the_empty_class():
    H, y, _, _ = make_data(40, 3, 3)
    with pytest.raises(InputError, match=r"class\(es\) \[3, 4\]"):
        measure(H, y, num_classes=5)
    with pytest.raises(InputError, match="num_classes is 2"):
        measure(H, y, num_classes=2)
    assert measure(H, y, num_classes=3)["num_classes"] == 3


def test_bad_bias_and_options():
    H, y, W, b = make_data(40, 3, 3)
    with pytest.raises(InputError) as ei:
        measure(H, y, W, b[:2])
    assert ei.value.field == "bias"
    with pytest.raises(InputError) as ei:
        measure(H, y, center="mean")
    assert ei.value.field == "center"
    with pytest.raises(InputError) as ei:
        measure(H, y, None, b)
    assert ei.value.field == "bias"


# ----------------------------------------------------------------------------------------- effective depth


def test_effective_depth_is_the_first_layer_within_eps():
    assert effective_depth([0.5, 0.2, 0.04, 0.01, 0.05], 0.05) == 3  # 1-based layer number
    assert effective_depth([0.5, 0.2], 0.1) is None
    assert effective_depth([0.0], 0.0) == 1
    with pytest.raises(InputError):
        effective_depth([0.1, 1.5], 0.1)
    with pytest.raises(InputError):
        effective_depth([0.1], -0.1)


def test_fast_path_sizes_run():
    # The trainer's size (N=10000, d=256, C=10, float32 torch): runs and gives sane values (no timing assert).
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (10000,), generator=g)
    H = torch.randn(10000, 256, generator=g) + 4 * torch.randn(10, 256, generator=g)[y]
    got = measure(H, y).to_dict()
    assert got["ncc_accuracy"] > 0.99 and 0 < got["nc1"] < 1
    assert math.isfinite(got["cdnv_mean"])


def test_runtime_self_check_raises_bound_violation(monkeypatch):
    import ncengine.bounds

    from ncengine.errors import BoundViolation

    H, y, W, _ = make_data(40, 3, 3)
    monkeypatch.setattr(ncengine.bounds, "min_loss_m", lambda alpha, beta, C: 1e6)  # a broken m
    with pytest.raises(BoundViolation, match="loss >= m"):
        measure(H, y, W)


def test_inputs_are_not_modified():
    H, y, W, b = make_data(50, 4, 3)
    Ht, yt = torch.from_numpy(H.copy()), torch.from_numpy(y.copy())
    measure(Ht, yt, torch.from_numpy(W), torch.from_numpy(b), center="global_mean")
    assert torch.equal(Ht, torch.from_numpy(H)) and torch.equal(yt, torch.from_numpy(y))

"""Tests for ncengine.ufm: the bounds become non-vacuous and every non-vacuous bound holds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from ncengine.bounds import min_loss_m
from ncengine.ufm import UFMConfig, cosines, optimize


def _pairwise_cos_reference(H, y, W):
    """O(N^2) obvious reference for the cosines (thesis section 2.2 definitions, i = j pairs included)."""
    C = W.shape[0]
    Hn = [h / np.linalg.norm(h) for h in H]
    intra = np.zeros(C)
    inter = np.zeros((C, C))
    for c in range(C):
        for k in range(C):
            vals = [float(np.dot(Hn[i], Hn[j])) for i in range(len(y)) if y[i] == c
                    for j in range(len(y)) if y[j] == k]
            inter[c, k] = sum(vals) / len(vals)
        intra[c] = inter[c, c]
    wbar = W.mean(axis=0)
    nc3 = np.zeros(C)
    for c in range(C):
        mu = H[y == c].mean(axis=0)
        v = W[c] - wbar
        nc3[c] = float(np.dot(v, mu) / (np.linalg.norm(v) * np.linalg.norm(mu)))
    return intra, inter, nc3


def test_cosines_match_pairwise_reference():
    rng = np.random.default_rng(3)
    C, d = 4, 5
    y = np.repeat(np.arange(C), [2, 3, 1, 4])
    H = rng.standard_normal((len(y), d))
    W = rng.standard_normal((C, d))
    intra, inter, nc3 = _pairwise_cos_reference(H, y, W)
    cs = cosines(H, y, W)
    np.testing.assert_allclose(cs["intra_cos"], intra, atol=1e-12)
    np.testing.assert_allclose(cs["inter_cos"], inter, atol=1e-12)
    np.testing.assert_allclose(cs["nc3_cos_thesis"], nc3, atol=1e-12)


@pytest.mark.parametrize("C", [3, 4, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_ufm_bounds_become_non_vacuous_and_hold(C, seed):
    calls = []
    res = optimize(C, C, 3, weight_decay=0.02, steps=1200, seed=seed, lr=0.5, record_every=100,
                   progress=lambda s, n, rec: calls.append((s, rec is not None)))
    assert len(calls) == 1201 and calls[-1] == (1200, True)
    hist = res.history
    assert [h["step"] for h in hist] == list(range(0, 1201, 100))
    kinds = ("intra", "inter", "nc3")
    for h in hist:
        b = h["bounds"]
        # loss >= m with an independently recomputed m
        assert h["loss"] >= min_loss_m(h["alpha"], h["beta"], C) - 1e-12
        for k in kinds:
            if not b[f"{k}_vacuous"]:
                assert b[f"{k}_cos_holds"] is True, (h["step"], k, b)
        # the measured extremes against the bound values, directly
        if not b["intra_vacuous"]:
            assert h["intra_cos_min"] >= b["intra_cos_lower"] - 1e-9
        if not b["inter_vacuous"]:
            assert h["inter_cos_max"] <= b["inter_cos_upper"] + 1e-9
        if not b["nc3_vacuous"]:
            assert h["nc3_cos_thesis_min"] >= b["nc3_cos_lower"] - 1e-9
    assert hist[0]["bounds"]["inter_vacuous"]  # random init: nothing to say
    last = hist[-1]["bounds"]
    assert not (last["intra_vacuous"] or last["inter_vacuous"] or last["nc3_vacuous"])
    assert last["inter_cos_upper"] < -1.0 / (C - 1) + 0.05  # informative, close to the ETF value
    assert hist[-1]["epsilon"] < 1e-6
    json.dumps(res.to_dict(), allow_nan=False)
    # the final configuration is a simplex ETF (independent check on the returned arrays)
    intra, inter, _ = _pairwise_cos_reference(res.H, res.y, res.W)
    off = ~np.eye(C, dtype=bool)
    np.testing.assert_allclose(inter[off], -1.0 / (C - 1), atol=1e-3)
    assert math.isclose(intra.min(), 1.0, abs_tol=1e-6)


def test_ufm_is_deterministic():
    a = optimize(3, 3, 2, 0.02, 50, seed=5, record_every=25)
    b = optimize(3, 3, 2, 0.02, 50, seed=5, record_every=25)
    np.testing.assert_array_equal(a.H, b.H)
    assert a.history == b.history


@pytest.mark.parametrize(
    "bad",
    [dict(num_classes=1), dict(weight_decay=0.0), dict(steps=0), dict(lr=-1.0), dict(dim=100_000),
     dict(samples_per_class=10_000, dim=4096, num_classes=1000), dict(unknown=1)],
)
def test_config_limits(bad):
    base = dict(num_classes=3, dim=3, samples_per_class=2, weight_decay=0.01, steps=10, seed=0)
    with pytest.raises(ValidationError):
        UFMConfig(**{**base, **bad})

"""Tests for ncengine.bounds: loss >= m (property), lambda vs a dense grid, exact optimum, soundness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncengine.bounds import min_loss_m, strong_convexity_lambda, theorem_2_3_1
from ncengine.errors import InputError
from ncengine.ufm import cosines


def _ref_balanced_ce(H, y, W, b=None):
    """Slow obvious reference: per-sample CE via a Python loop, then class-balanced mean (float64)."""
    C = W.shape[0]
    losses = [[] for _ in range(C)]
    for h, c in zip(H, y):
        z = [float(np.dot(W[k], h)) + (0.0 if b is None else float(b[k])) for k in range(C)]
        zmax = max(z)
        lse = zmax + math.log(sum(math.exp(v - zmax) for v in z))
        losses[c].append(lse - z[c])
    return sum(sum(v) / len(v) for v in losses) / C


def _fold_alpha_beta(H, y, W, b=None):
    C = W.shape[0]
    if b is not None:  # thesis: h -> [h, 1], W -> [W, b]
        H = np.hstack([H, np.ones((H.shape[0], 1))])
        W = np.hstack([W, b[:, None]])
    alpha2 = np.mean([np.mean(np.sum(H[y == c] ** 2, axis=1)) for c in range(C)])
    beta = np.linalg.norm(W) / math.sqrt(C)
    return math.sqrt(alpha2), beta


@settings(max_examples=60, deadline=None)
@given(
    C=st.integers(2, 6),
    d=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 20.0),
    bias=st.booleans(),
    imbalance=st.booleans(),
)
def test_loss_at_least_m(C, d, seed, scale, bias, imbalance):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, size=C) if imbalance else np.full(C, 3)
    y = np.repeat(np.arange(C), counts)
    H = scale * rng.standard_normal((len(y), d))
    W = scale * rng.standard_normal((C, d))
    b = scale * rng.standard_normal(C) if bias else None
    loss = _ref_balanced_ce(H, y, W, b)
    alpha, beta = _fold_alpha_beta(H, y, W, b)
    m = min_loss_m(alpha, beta, C)
    assert loss >= m - 1e-12 * max(1.0, m)
    r = theorem_2_3_1(alpha, beta, C, max(loss, m))
    assert r.epsilon >= 0.0


def test_min_loss_m_closed_form_and_stability():
    # direct formula where it does not overflow
    for C, a, bt in [(2, 0.3, 0.7), (5, 1.0, 2.0), (10, 0.0, 3.0)]:
        ref = math.log(1 + (C - 1) * math.exp(-C / (C - 1) * a * bt))
        assert min_loss_m(a, bt, C) == pytest.approx(ref, rel=1e-14)
    # far tail: m ~ (C-1) exp(-C/(C-1) a b), no underflow to 0 before the true value does
    C, ab = 4, 300.0
    assert min_loss_m(ab, 1.0, C) == pytest.approx(3 * math.exp(-4 / 3 * ab), rel=1e-12)


@pytest.mark.parametrize("C,alpha,beta", [(2, 0.5, 0.5), (3, 1.0, 1.0), (4, 2.0, 1.5), (10, 0.3, 0.9), (7, 3.0, 2.0)])
def test_lambda_matches_dense_minimum(C, alpha, beta):
    R = C * alpha * beta
    x = np.linspace(-R, R, 400_001)
    fpp = (C - 1) * np.exp(x) / (1 + (C - 1) * np.exp(x)) ** 2
    lam = strong_convexity_lambda(alpha, beta, C)
    assert lam <= fpp.min() * (1 + 1e-12)
    assert lam == pytest.approx(fpp.min(), rel=1e-9)


def _etf(C, d):
    """Simplex ETF rows (C, d), unit norm, via the centred identity embedded in d >= C dims."""
    P = np.eye(C) - 1.0 / C
    U = P / np.linalg.norm(P, axis=1, keepdims=True)
    out = np.zeros((C, d))
    out[:, :C] = U
    return out


@pytest.mark.parametrize("C", [2, 3, 4, 10])
def test_exact_optimum_gives_limits(C):
    alpha, beta, n = 1.7, 1.3, 3
    U = _etf(C, C + 1)
    y = np.repeat(np.arange(C), n)
    H = alpha * U[y]  # every feature at norm alpha on its ETF vertex
    W = beta * U  # ||W||_F / sqrt(C) = beta
    loss = _ref_balanced_ce(H, y, W)
    a2, b2 = _fold_alpha_beta(H, y, W)
    assert (a2, b2) == pytest.approx((alpha, beta), rel=1e-14)
    r = theorem_2_3_1(alpha, beta, C, loss)
    assert abs(r.epsilon) <= 1e-12
    exact = theorem_2_3_1(alpha, beta, C, min_loss_m(alpha, beta, C))
    assert exact.epsilon == 0.0
    assert exact.intra_cos_lower == pytest.approx(1.0, abs=1e-12)
    assert exact.nc3_cos_lower == pytest.approx(1.0, abs=1e-12)
    assert exact.inter_cos_upper == pytest.approx(-1.0 / (C - 1), abs=1e-12)
    assert not (exact.intra_vacuous or exact.inter_vacuous or exact.nc3_vacuous)
    out = r.check(**cosines(H, y, W))
    assert out["intra_cos_holds"] and out["inter_cos_holds"] and out["nc3_cos_holds"]
    assert out["intra_cos_lower"] == pytest.approx(1.0, abs=1e-6)
    assert out["inter_cos_upper"] == pytest.approx(-1.0 / (C - 1), abs=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_bounds_sound_near_optimum(seed):
    """Perturb an ETF configuration: the non-vacuous bounds must hold for the measured cosines."""
    rng = np.random.default_rng(seed)
    C = int(rng.integers(2, 8))
    d, n = C + 2, int(rng.integers(1, 5))
    alpha, beta = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)
    U = _etf(C, d)
    y = np.repeat(np.arange(C), n)
    t = 10 ** rng.uniform(-4, -1)
    H = alpha * U[y] + t * rng.standard_normal((len(y), d))
    W = beta * U + t * rng.standard_normal((C, d))
    loss = _ref_balanced_ce(H, y, W)
    a2, b2 = _fold_alpha_beta(H, y, W)
    r = theorem_2_3_1(a2, b2, C, loss)
    out = r.check(**cosines(H, y, W))
    cs = cosines(H, y, W)
    for key, measured in (("intra_cos", cs["intra_cos"].min()), ("nc3_cos", cs["nc3_cos_thesis"].min())):
        lower = out[f"{key}_lower"]
        if lower is not None and not out[f"{key.split('_')[0]}_vacuous"]:
            assert measured >= lower - 1e-9
    off = ~np.eye(C, dtype=bool)
    if out["inter_cos_upper"] is not None and not out["inter_vacuous"]:
        assert cs["inter_cos"][off].max() <= out["inter_cos_upper"] + 1e-9
    assert out["intra_cos_holds"] is not False
    assert out["inter_cos_holds"] is not False
    assert out["nc3_cos_holds"] is not False


def test_check_reports_violations_and_is_json_safe():
    C = 4
    r = theorem_2_3_1(2.0, 2.0, C, min_loss_m(2.0, 2.0, C))  # epsilon = 0: bounds at their limits
    bad = r.check(intra_cos=np.full(C, 0.5), inter_cos=np.zeros((C, C)), nc3_cos_thesis=np.full(C, 0.2))
    assert bad["intra_cos_holds"] is False and bad["intra_cos_violations"] == C
    assert bad["inter_cos_holds"] is False and bad["inter_cos_violations"] == C * (C - 1)
    assert bad["nc3_cos_holds"] is False and bad["nc3_cos_violations"] == C
    json.dumps(bad, allow_nan=False)
    vac = theorem_2_3_1(0.0, 1.0, C, 2.0)  # alpha beta = 0: nothing can be said
    out = vac.check(np.zeros(C), np.zeros((C, C)), np.zeros(C))
    assert vac.inter_vacuous and out["inter_cos_holds"] is None
    json.dumps(out, allow_nan=False)


def test_delta_fractions():
    C = 20
    r_all = theorem_2_3_1(2.0, 2.0, C, min_loss_m(2.0, 2.0, C) + 1e-9)
    assert r_all.intra_fraction == 1.0 and r_all.inter_fraction == 1.0
    r = theorem_2_3_1(2.0, 2.0, C, min_loss_m(2.0, 2.0, C) + 1e-9, delta=0.5)  # 3/delta = 6 < C
    assert r.intra_fraction == pytest.approx(1 - 9 / 20)  # fewer than delta C = 10 classes uncovered
    assert r.intra_cos_lower > r_all.intra_cos_lower  # a smaller Markov multiplier: tighter, fewer classes


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(alpha=1.0, beta=1.0, num_classes=1, loss=1.0), "num_classes"),
        (dict(alpha=-1.0, beta=1.0, num_classes=3, loss=1.0), "alpha"),
        (dict(alpha=1.0, beta=float("nan"), num_classes=3, loss=1.0), "beta"),
        (dict(alpha=1.0, beta=1.0, num_classes=3, loss=0.0), "loss"),
        (dict(alpha=1.0, beta=1.0, num_classes=3, loss=1.0, delta=0.0), "delta"),
    ],
)
def test_input_errors(kwargs, field):
    with pytest.raises(InputError) as e:
        theorem_2_3_1(**kwargs)
    assert e.value.field == field

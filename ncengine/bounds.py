"""Theorem 2.3.1 of the thesis (near-optimal cross-entropy loss forces Neural Collapse), made explicit.

Source: thesis "Neural Collapse for unbiased classifiers at near-optimal cross-entropy loss", Theorem 2.3.1
and its proof (section 2.4, eqs. 2.10-2.23, Lemmas 2.4.1-2.4.6); the theorem is Pan & Cao (2023),
"Towards understanding neural collapse: the effects of batch normalization and weight decay", arXiv:2309.04644.
The derivation of every constant is in ``docs/bounds.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ncengine.errors import InputError
from ncengine.jsonsafe import json_safe


def _check_scalars(alpha: float, beta: float, num_classes: int) -> None:
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 2:
        raise InputError("num_classes", f"got {num_classes!r}", expected="an integer >= 2")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(float(v)) or float(v) < 0:
            raise InputError(name, f"got {v!r}", expected="a finite number >= 0")


def min_loss_m(alpha: float, beta: float, num_classes: int) -> float:
    """Minimum cross-entropy loss reachable at RMS feature norm ``alpha`` and weight scale ``beta``.

    ``m = log(1 + (C-1) exp(-C/(C-1) alpha beta))`` (thesis Theorem 2.3.1), computed as
    ``logaddexp(0, log(C-1) - C/(C-1) alpha beta)`` so it neither overflows nor loses digits.

    Args:
        alpha: RMS feature norm ``sqrt(mean ||h||^2)`` (bias folded), >= 0.
        beta: ``||W||_F / sqrt(C)`` (bias folded), >= 0.
        num_classes: C >= 2.

    Returns:
        m as a python float (nats).

    Raises:
        InputError: C < 2, or alpha/beta negative or not finite.
    """
    _check_scalars(alpha, beta, num_classes)
    C = int(num_classes)
    x = -C / (C - 1) * float(alpha) * float(beta)
    return float(np.logaddexp(0.0, math.log(C - 1) + x))


def strong_convexity_lambda(alpha: float, beta: float, num_classes: int) -> float:
    """Exact minimum of ``f''`` for ``f(x) = log(1 + (C-1) e^x)`` on ``[-C alpha beta, C alpha beta]``.

    ``f''(x) = s(z) s(-z)`` with ``z = x + log(C-1)`` and ``s`` the logistic function; it is unimodal in
    ``z`` with its peak at ``z = 0``, so its minimum on the interval is at the endpoint with the larger
    ``|z|``, which is ``x = C alpha beta`` because ``log(C-1) >= 0``. Evaluated as
    ``e^{-|z|} / (1 + e^{-|z|})^2`` (no overflow). Thesis Lemma 2.4.2 (strong convexity modulus).
    """
    _check_scalars(alpha, beta, num_classes)
    C = int(num_classes)
    a = C * float(alpha) * float(beta)
    z = max(abs(-a + math.log(C - 1)), abs(a + math.log(C - 1)))
    t = math.exp(-z)
    return t / (1.0 + t) ** 2


@dataclass(frozen=True)
class BoundResult:
    """Explicit Theorem 2.3.1 bounds for one (alpha, beta, C, loss). All fields are python scalars."""

    alpha: float
    beta: float
    num_classes: int
    loss: float
    min_loss_m: float
    epsilon: float
    strong_convexity_lambda: float
    delta: float | None
    intra_cos_lower: float | None
    inter_cos_upper: float | None
    nc3_cos_lower: float | None
    intra_fraction: float | None
    inter_fraction: float | None
    nc3_fraction: float | None
    intra_vacuous: bool
    inter_vacuous: bool
    nc3_vacuous: bool
    inter_target: float
    epsilon_rounding: float = 0.0

    def to_dict(self) -> dict:
        """JSON-safe dict (no NaN: undefined values are None)."""
        return {k: json_safe(v) for k, v in asdict(self).items()}

    def check(self, intra_cos, inter_cos, nc3_cos_thesis) -> dict:
        """Compare measured cosines against the bounds.

        Args:
            intra_cos: (C,) per-class intra-class cosine (thesis section 2.2).
            inter_cos: (C, C) pairwise inter-class cosines; the diagonal is ignored.
            nc3_cos_thesis: (C,) ``cos(w_c - mean_c' w_c', mean_i h_ci)`` (thesis eq. 2.21).

        Returns:
            ``to_dict()`` plus, per bound, ``<name>_holds`` (bool, or None when no bound is available),
            ``<name>_violations`` (number of classes / ordered pairs violating it) and
            ``<name>_allowed_violations`` (classes / ordered pairs the theorem may leave uncovered for this
            delta; 0 by default). ``holds`` means violations <= allowed (a vacuous bound always holds); None
            when no bound could be formed.
        """
        C = self.num_classes
        intra = np.asarray(intra_cos, dtype=np.float64).reshape(-1)
        inter = np.asarray(inter_cos, dtype=np.float64)
        nc3 = np.asarray(nc3_cos_thesis, dtype=np.float64).reshape(-1)
        if intra.shape != (C,):
            raise InputError("intra_cos", f"shape {intra.shape}", expected=f"({C},)")
        if inter.shape != (C, C):
            raise InputError("inter_cos", f"shape {inter.shape}", expected=f"({C}, {C})")
        if nc3.shape != (C,):
            raise InputError("nc3_cos_thesis", f"shape {nc3.shape}", expected=f"({C},)")
        off = ~np.eye(C, dtype=bool)
        out = self.to_dict()
        tol = 1e-9
        specs = (
            ("intra_cos", self.intra_cos_lower, self.intra_fraction, intra < (self.intra_cos_lower or 0) - tol, C),
            ("inter_cos", self.inter_cos_upper, self.inter_fraction,
             (inter > (self.inter_cos_upper or 0) + tol) & off, C * (C - 1)),
            ("nc3_cos", self.nc3_cos_lower, self.nc3_fraction, nc3 < (self.nc3_cos_lower or 0) - tol, C),
        )
        for name, bound, frac, viol, total in specs:
            if bound is None or frac is None:
                out[f"{name}_holds"] = None
                out[f"{name}_violations"] = None
                out[f"{name}_allowed_violations"] = None
                continue
            n_viol = int(np.count_nonzero(viol))
            allowed = int(math.floor(total * (1.0 - frac) + 1e-9))
            out[f"{name}_violations"] = n_viol
            out[f"{name}_allowed_violations"] = allowed
            out[f"{name}_holds"] = bool(n_viol <= allowed)
        return out

def default_delta(num_classes: int) -> float:
    """Default ``delta = 1/C``: fewer than ``delta C = 1`` exceptional classes, i.e. every class and pair."""
    return 1.0 / int(num_classes)


def rounding_allowance(alpha: float, beta: float, num_classes: int, loss: float) -> float:
    """Absolute rounding error allowed for a float64 ``loss`` (nats), added to ``epsilon`` by the bounds.

    ``2^-40 (1 + |loss| + C alpha beta)``, i.e. 4096 units in the last place of the logit scale. The logit
    differences ``z_j - z_c`` of one sample carry an absolute error of about ``(d + 2) u max_j ||w_j|| ||h||``
    (``u = 2^-53``), whose class-balanced mean is at most ``(d + 2) u C alpha beta``. ``measure`` computes the
    loss as ``log(1 + sum_{j != c} e^{z_j - z_c})``, whose error is that times ``1 - e^{-loss_i} <= 1`` (a
    ``logsumexp(z) - z_c`` loss has the full error), so this allowance bounds it; ``epsilon = loss - m``
    inherits it, and the bounds amplify it by ``e^{kappa alpha beta}/(alpha beta)`` (docs/bounds.md S3), so
    without this allowance a rounding error alone can "violate" a bound (docs/bounds.md section 4,
    regression test ``test_rounding_*``).
    """
    return 2.0 ** -40 * (1.0 + abs(float(loss)) + int(num_classes) * float(alpha) * float(beta))


def theorem_2_3_1(alpha: float, beta: float, num_classes: int, loss: float, delta: float | None = None,
                  rounding: float | None = None) -> BoundResult:
    """Explicit bounds of thesis Theorem 2.3.1 for a measured (alpha, beta, C, loss).

    The constants are derived in ``docs/bounds.md`` (steps S1-S9) along the thesis's proof (section 2.4:
    Jensen over the wrong logits, Jensen over samples, Cauchy-Schwarz; Lemmas 2.4.1-2.4.6). Every bound is
    a theorem with explicit constants, no hidden O(.).

    Args:
        alpha: RMS feature norm (bias folded; class-balanced for unequal classes).
        beta: ``||W||_F / sqrt(C)`` (bias folded).
        num_classes: C >= 2.
        loss: measured (class-balanced) cross-entropy, nats.
        delta: fraction parameter in (0, 1]: the statements hold for all but fewer than ``delta C`` classes
            (and all ordered pairs of two covered classes). Default ``1/C``: every class and every pair.
        rounding: absolute error (nats) the bounds allow in ``loss``; they use ``epsilon + rounding``.
            Default :func:`rounding_allowance` (float64 loss from logits); pass 0.0 for an exact loss.

    Returns:
        BoundResult: ``intra_cos_lower`` (for covered classes ``intra_c >= intra_cos_lower``; values <= 0
        are vacuous), ``inter_cos_upper`` (``inter_cc' <= inter_cos_upper``), ``nc3_cos_lower``
        (``cos(w_c - mean w, mu_c) >= nc3_cos_lower``), the covered fractions and ``*_vacuous`` flags.
        A bound that cannot be formed (e.g. alpha beta = 0) is None and vacuous.

    Raises:
        InputError: invalid scalars, delta or rounding, or ``loss < m`` beyond rounding (impossible for a true
            loss).
    """
    _check_scalars(alpha, beta, num_classes)
    C = int(num_classes)
    m = min_loss_m(alpha, beta, C)
    loss = float(loss)
    if not math.isfinite(loss):
        raise InputError("loss", f"got {loss!r}", expected="a finite number")
    if loss < m - 1e-9 * max(1.0, abs(m)):
        raise InputError("loss", f"loss {loss!r} < minimum m = {m!r}", expected="loss >= m (Theorem 2.3.1)")
    if delta is None:
        delta = default_delta(C)
    delta = float(delta)
    if not (0.0 < delta <= 1.0):
        raise InputError("delta", f"got {delta!r}", expected="0 < delta <= 1")
    eps = max(loss - m, 0.0)
    if rounding is None:
        rounding = rounding_allowance(alpha, beta, C, loss)
    rounding = float(rounding)
    if not (math.isfinite(rounding) and rounding >= 0.0):
        raise InputError("rounding", f"got {rounding!r}", expected="a finite number >= 0")
    lam = strong_convexity_lambda(alpha, beta, C)
    ex = explicit_bounds(float(alpha), float(beta), C, eps + rounding, delta)
    intra_l, inter_u, nc3_l = ex["intra_cos_lower"], ex["inter_cos_upper"], ex["nc3_cos_lower"]
    n_bad = ex["max_uncovered_classes"]
    frac_cls = 1.0 - n_bad / C
    frac_pair = max(0.0, 1.0 - min(C * (C - 1), 2 * n_bad * (C - 1)) / (C * (C - 1)))
    return BoundResult(
        alpha=float(alpha), beta=float(beta), num_classes=C, loss=loss, min_loss_m=m, epsilon=eps,
        strong_convexity_lambda=lam, delta=delta,
        intra_cos_lower=intra_l, inter_cos_upper=inter_u, nc3_cos_lower=nc3_l,
        intra_fraction=frac_cls, inter_fraction=frac_pair, nc3_fraction=frac_cls,
        intra_vacuous=intra_l is None or not (0.0 < intra_l <= 1.0),
        inter_vacuous=inter_u is None or not (-1.0 <= inter_u < 1.0),
        nc3_vacuous=nc3_l is None or not (-1.0 < nc3_l <= 1.0),
        inter_target=-1.0 / (C - 1), epsilon_rounding=rounding,
    )


def _logistic(z):
    z = np.asarray(z, dtype=np.float64)
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def _psi_inv(B: float) -> float:
    """Inverse of psi(r) = e^r - 1 - r on r >= 0, by bisection (returns the upper end: a safe over-estimate)."""
    if B <= 0.0:
        return 0.0
    if not math.isfinite(B):
        return math.inf
    # psi(r) >= r^2/2 and psi(2 log1p(B) + 2) >= B bracket the root
    lo, hi = 0.0, min(math.sqrt(2.0 * B), 2.0 * math.log1p(B) + 2.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if math.expm1(mid) - mid < B:
            lo = mid
        else:
            hi = mid
    return hi


_THETAS = np.linspace(0.005, 0.995, 199)


def _expm1_minus_x_small(x: np.ndarray) -> np.ndarray:
    """``e^x - 1 - x`` for 0 <= x < 0.5 by its Taylor series (no cancellation)."""
    term, acc = x * x / 2.0, np.zeros_like(x)
    for k in range(3, 30):
        acc = acc + term
        term = term * x / k
    return acc


def _log1p_minus_x_small(y: np.ndarray) -> np.ndarray:
    """``log(1 + y) - y`` for 0 <= y < 0.25 by its alternating series (no cancellation)."""
    acc, pw = np.zeros_like(y), y * y
    for k in range(2, 40):
        acc = acc + (-1.0 if k % 2 == 0 else 1.0) * pw / k
        pw = pw * y
    return acc


def _bregman(delta_t: np.ndarray, s: float) -> np.ndarray:
    """``D = softplus(t_a + dt) - softplus(t_a) - s dt``, ``s = logistic(t_a)`` in (0, 1), dt >= 0.

    ``softplus(t_a + dt) - softplus(t_a) = log1p(y)`` with ``y = s expm1(dt)``, so ``D = log1p(y) - s dt``.
    For ``dt < 0.5`` that difference cancels, and ``D = s (expm1(dt) - dt) + (log1p(y) - y)`` is used with
    both brackets by series. ``y = exp(log s + dt + log(1 - e^{-dt}))`` never overflows before ``y`` itself.
    Relative error a few ulp times ``1/(1 - s)`` (docs/bounds.md S4; checked against 50 digits in the tests).
    """
    dt = np.asarray(delta_t, dtype=np.float64)
    small = dt < 0.5
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        y = np.exp(math.log(s) + dt + np.log(-np.expm1(-dt)))
        ds = np.where(small, dt, 0.0)
        ys = np.where(small & (y < 0.25), y, 0.0)
        lp = np.where(y < 0.25, _log1p_minus_x_small(ys), np.log1p(y) - y)
        d_small = s * _expm1_minus_x_small(ds) + lp
        d_big = np.log1p(y) - s * dt
    return np.maximum(np.where(small, d_small, d_big), 0.0)


def explicit_bounds(alpha: float, beta: float, num_classes: int, epsilon: float, delta: float) -> dict:
    """The explicit constants of docs/bounds.md (steps S1-S9). Returns a dict of python floats / None.

    Notation: ``a = alpha beta``, ``kappa = C/(C-1)``, ``phi(p) = log(1 + (C-1) e^{-kappa p})`` (the loss
    as a function of the margin ``p = (w_c - mean w) . h``), ``s_a = -phi'(a)/kappa``, ``D`` the Bregman
    divergence of ``phi`` at ``a``. ``M`` is the Markov multiplier: ``min(C, 3/delta)``.
    """
    C = int(num_classes)
    a = alpha * beta
    out = {"intra_cos_lower": None, "inter_cos_upper": None, "nc3_cos_lower": None,
           "max_uncovered_classes": 0, "markov_multiplier": None, "eta1": None, "margin_lower": None}
    kappa = C / (C - 1)
    L1 = math.log(C - 1)
    if 3.0 / delta >= C:
        M, n_bad = float(C), 0
    else:
        M, n_bad = 3.0 / delta, int(math.ceil(delta * C - 1e-12)) - 1
    out["max_uncovered_classes"] = n_bad
    out["markov_multiplier"] = M
    if not (a > 0.0):
        out["max_uncovered_classes"] = C
        return out
    s_a = float(_logistic(L1 - kappa * a))  # -phi'(a)/kappa, (S3)
    if s_a < 1e-300:  # e^{-kappa a} underflowed or is subnormal: e^{kappa a} makes every bound vacuous
        if epsilon > 0.0:
            return out
        eta1 = 0.0
    else:
        eta1 = epsilon / (kappa * s_a)  # (S3): mean (||v|| ||h|| - p) <= a - E p <= eta1
    if not math.isfinite(eta1):
        return out
    out["eta1"] = eta1
    th = _THETAS
    p = th * a
    dt = kappa * (1.0 - th) * a  # phi(p) = softplus(t_a + dt) with t_a = log(C-1) - kappa a
    D_th = _bregman(dt, s_a)  # Bregman D(theta a) >= 0, (S4), without cancellation
    # |D'(theta a)| = kappa (logistic(t_a + dt) - logistic(t_a))
    #              = kappa logistic(t_a + dt) (1 - s_a) (1 - e^{-dt})
    dD_th = kappa * _logistic(L1 - kappa * p) * _logistic(kappa * a - L1) * -np.expm1(-dt)  # (S6)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.where(D_th > 0, np.minimum(1.0, M * epsilon / D_th), 1.0)  # fraction of low-margin samples
        c1 = 1.0 - 2.0 * o - M * eta1 / p  # (S5): mean_i cos(h_ci, v_c) >= c1
        P = np.where(dD_th > 0, p - M * epsilon / dD_th, -np.inf)  # (S6): v_c . mu_c >= P
    c1_best = float(np.max(c1))
    out["intra_cos_lower"] = c1_best * c1_best if c1_best > 0 else c1_best
    P_best = float(np.max(P))
    out["margin_lower"] = P_best if math.isfinite(P_best) else None
    if not (P_best > 0):
        return out
    gamma = P_best / (P_best + M * eta1)  # (S6): cos(v_c, mu_c) >= gamma
    out["nc3_cos_lower"] = gamma
    if c1_best <= 0 or gamma <= 0:
        return out
    # (S7) class margins: v_c . mu_c <= ||v_c|| mean_i ||h_ci|| <= U
    U = C * a - (C - 1 - n_bad) * P_best
    # (S8) wrong-logit spread r for covered classes
    with np.errstate(over="ignore"):
        B = math.expm1(M * epsilon) * (math.exp(min(kappa * U, 700.0)) + C - 1)
    if kappa * U > 700.0:
        return out
    r = _psi_inv(B)
    # (S9) norm ratio of rows of v = W - mean W, then pairwise cosine
    v_lo = P_best / (math.sqrt(C) * alpha)
    v_hi2 = C * beta * beta - (C - 1 - n_bad) * v_lo * v_lo
    if not (v_hi2 > 0 and v_lo > 0) or not math.isfinite(r):
        return out
    v_hi = math.sqrt(v_hi2)
    R = v_hi / v_lo + v_lo / v_hi
    Gam = math.sqrt(max(0.0, 1.0 - gamma * gamma))
    rhs = -2.0 * gamma / (C - 1) + r * R / P_best + 2.0 * Gam
    X = rhs / (2.0 * gamma) if rhs >= 0 else rhs / 2.0
    out["inter_cos_upper"] = X + 2.0 * math.sqrt(max(0.0, 2.0 * (1.0 - c1_best)))
    return out

"""Unconstrained features model (UFM, layer-peeled model) with cross-entropy and weight decay.

Gradient descent directly on free features ``H`` (N, d) and classifier ``W`` (C, d), objective (thesis
eq. 2.1 with the network replaced by free features, as in Mixon et al. 2020 / Zhu et al. 2021):

    F(H, W) = (1/N) sum_i CE(W h_i, y_i) + (weight_decay / 2) (||W||_F^2 + ||H||_F^2 / N)
            = loss + (weight_decay / 2) (C beta^2 + alpha^2),

with ``alpha = sqrt(mean ||h_i||^2)`` and ``beta = ||W||_F / sqrt(C)`` (no bias). Classes are balanced.
Along the way it records the loss, ``epsilon = loss - m``, the Theorem 2.3.1 bound block checked against
the measured cosines (``ncengine.bounds``), so one can watch the bounds become non-vacuous as
``epsilon -> 0``. Runs in float64 on the CPU; deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ncengine.bounds import theorem_2_3_1

MAX_ELEMENTS = 5_000_000  # N * d + C * d, keeps one job's memory and time bounded


class UFMConfig(BaseModel):
    """Validated configuration of a ``kind: "ufm"`` job (the service validates job configs with it)."""

    model_config = ConfigDict(extra="forbid")

    num_classes: int = Field(ge=2, le=1000, description="C")
    dim: int = Field(ge=1, le=4096, description="feature dimension d")
    samples_per_class: int = Field(ge=1, le=10_000, description="n; N = C n")
    weight_decay: float = Field(gt=0.0, le=1.0, description="lambda on both W and H (per sample)")
    steps: int = Field(ge=1, le=1_000_000, description="gradient descent steps")
    seed: int = Field(ge=0, le=2**31 - 1)
    lr: float = Field(default=0.5, gt=0.0, le=10.0, description="gradient descent step size")
    record_every: int = Field(default=100, ge=1, description="record every this many steps (and the last)")
    init_scale: float = Field(default=0.1, gt=0.0, le=10.0, description="std of the Gaussian init")

    @model_validator(mode="after")
    def _size(self) -> UFMConfig:
        n_el = self.num_classes * self.samples_per_class * self.dim + self.num_classes * self.dim
        if n_el > MAX_ELEMENTS:
            raise ValueError(f"N*d + C*d = {n_el} exceeds {MAX_ELEMENTS}")
        return self


@dataclass
class UFMResult:
    """Outcome of :func:`optimize`.

    Attributes:
        config: the validated config.
        history: one dict per recorded step: ``step``, ``loss``, ``objective``, ``alpha``, ``beta``,
            ``min_loss_m``, ``epsilon``, ``bounds`` (``BoundResult.check`` output), ``intra_cos_min``,
            ``inter_cos_max``, ``nc3_cos_thesis_min`` and ``metrics`` (``ncengine.metrics.measure``'s
            dict when that module is available, else None). All JSON-safe.
        H: (N, d) float64 final features. y: (N,) int64 labels. W: (C, d) float64 final weights.
    """

    config: UFMConfig
    history: list[dict] = field(default_factory=list)
    H: np.ndarray | None = None
    y: np.ndarray | None = None
    W: np.ndarray | None = None

    @property
    def final(self) -> dict:
        return self.history[-1]

    def to_dict(self) -> dict:
        return {"config": self.config.model_dump(), "history": self.history}


def cosines(H: np.ndarray, y: np.ndarray, W: np.ndarray) -> dict:
    """The cosines Theorem 2.3.1 speaks of, in float64, O(N d + C^2 d).

    Returns ``intra_cos`` (C,) = ``||mean_i h_ci/||h_ci|| ||^2`` (includes i = j pairs, thesis section 2.2),
    ``inter_cos`` (C, C) = ``s_c . s_c'`` with ``s_c`` the mean normalized feature, and ``nc3_cos_thesis``
    (C,) = ``cos(w_c - mean_c' w_c', mean_i h_ci)`` (thesis eq. 2.21). Zero-norm features count as 0.
    """
    H = np.asarray(H, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    y = np.asarray(y)
    C = W.shape[0]
    norms = np.linalg.norm(H, axis=1, keepdims=True)
    Hn = np.divide(H, norms, out=np.zeros_like(H), where=norms > 0)
    counts = np.bincount(y, minlength=C).astype(np.float64)
    S = np.zeros((C, H.shape[1]))  # (C, d) mean normalized features
    np.add.at(S, y, Hn)
    S /= counts[:, None]
    mu = np.zeros((C, H.shape[1]))  # (C, d) uncentered class means
    np.add.at(mu, y, H)
    mu /= counts[:, None]
    V = W - W.mean(axis=0, keepdims=True)  # (C, d)
    den = np.linalg.norm(V, axis=1) * np.linalg.norm(mu, axis=1)
    nc3 = np.divide(np.sum(V * mu, axis=1), den, out=np.zeros(C), where=den > 0)
    G = S @ S.T
    return {"intra_cos": np.diag(G).copy(), "inter_cos": G, "nc3_cos_thesis": nc3}


def _measure_dict(H: np.ndarray, y: np.ndarray, W: np.ndarray) -> dict | None:
    try:
        from ncengine.metrics import measure  # written by another engineer; optional here
    except ImportError:
        return None
    return measure(H, y, W).to_dict()


def _record(step: int, H: torch.Tensor, W: torch.Tensor, y: torch.Tensor, wd: float) -> dict:
    with torch.no_grad():
        C = W.shape[0]
        loss = float(torch.nn.functional.cross_entropy(H @ W.T, y))
        alpha = float(torch.sqrt((H * H).sum(dim=1).mean()))
        beta = float(torch.linalg.norm(W) / math.sqrt(C))
        Hn, Wn, yn = H.numpy().copy(), W.numpy().copy(), y.numpy().copy()
    br = theorem_2_3_1(alpha, beta, C, loss)
    cs = cosines(Hn, yn, Wn)
    off = ~np.eye(C, dtype=bool)
    return {
        "step": step,
        "loss": loss,
        "objective": loss + 0.5 * wd * (C * beta * beta + alpha * alpha),
        "alpha": alpha,
        "beta": beta,
        "min_loss_m": br.min_loss_m,
        "epsilon": br.epsilon,
        "bounds": br.check(**cs),
        "intra_cos_min": float(cs["intra_cos"].min()),
        "inter_cos_max": float(cs["inter_cos"][off].max()),
        "nc3_cos_thesis_min": float(cs["nc3_cos_thesis"].min()),
        "metrics": _measure_dict(Hn, yn, Wn),
    }


def optimize(
    num_classes: int,
    dim: int,
    samples_per_class: int,
    weight_decay: float,
    steps: int,
    seed: int,
    lr: float = 0.5,
    record_every: int = 100,
    progress: Callable[[int, int, dict | None], None] | None = None,
    init_scale: float = 0.1,
) -> UFMResult:
    """Run full-batch gradient descent on the UFM and record the bound along the way.

    Args:
        num_classes: C >= 2. dim: d. samples_per_class: n (N = C n, balanced).
        weight_decay: lambda > 0 on W and (per sample) on H. steps: GD steps. seed: RNG seed.
        lr: step size. record_every: record cadence in steps (step 0 and the last step are always recorded).
        progress: called as ``progress(step, steps, record_or_None)`` after every step (record only on
            recorded steps); returns nothing. A caller may raise from it to cancel.
        init_scale: std of the Gaussian initialisation of H and W.

    Returns:
        UFMResult with the history and the final H, y, W (float64 numpy).

    Raises:
        pydantic.ValidationError: the arguments fail :class:`UFMConfig`'s limits.
    """
    cfg = UFMConfig(num_classes=num_classes, dim=dim, samples_per_class=samples_per_class,
                    weight_decay=weight_decay, steps=steps, seed=seed, lr=lr, record_every=record_every,
                    init_scale=init_scale)
    C, n, d = cfg.num_classes, cfg.samples_per_class, cfg.dim
    N = C * n
    g = torch.Generator().manual_seed(cfg.seed)
    H = cfg.init_scale * torch.randn(N, d, generator=g, dtype=torch.float64)  # (N, d)
    W = cfg.init_scale * torch.randn(C, d, generator=g, dtype=torch.float64)  # (C, d)
    y = torch.arange(C).repeat_interleave(n)  # (N,)
    Y = torch.nn.functional.one_hot(y, C).to(torch.float64)  # (N, C)
    wd = cfg.weight_decay
    result = UFMResult(config=cfg)
    rec = _record(0, H, W, y, wd)
    result.history.append(rec)
    if progress is not None:
        progress(0, cfg.steps, rec)
    for step in range(1, cfg.steps + 1):
        # closed-form gradient of F (no autograd: it dominates the cost at these sizes)
        G = (torch.softmax(H @ W.T, dim=1) - Y) / N  # (N, C) dF/dZ
        gW = G.T @ H + wd * W  # (C, d)
        gH = G @ W + (wd / N) * H  # (N, d)
        # the loss is a mean over N samples, so each h_i gets gradient O(1/N): scale its step by N
        H = H - (cfg.lr * N) * gH
        W = W - cfg.lr * gW
        rec = None
        if step % cfg.record_every == 0 or step == cfg.steps:
            rec = _record(step, H, W, y, wd)
            result.history.append(rec)
        if progress is not None:
            progress(step, cfg.steps, rec)
    result.H = H.numpy().copy()
    result.W = W.numpy().copy()
    result.y = y.numpy().copy()
    return result

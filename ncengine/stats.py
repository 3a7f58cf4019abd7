"""Streaming float64 accumulators for the Neural Collapse statistics.

Two passes, as in DESIGN.md §1 (and the accumulator pattern of rhubarbwu/neural-collapse and torchmetrics):

* pass 1, :class:`ClassMeanAccumulator`: per-class sample counts, feature sums and squared-norm sums, from
  which the class means ``mu_c`` are fixed;
* pass 2, :class:`CenteredAccumulator`: statistics centred on those frozen means (within-class scatter,
  its projection on the rank-(C-1) range of ``Sigma_B``), sums of unit-normalised features for the cosine
  measures (thesis Lemma 2.4.4), nearest-class-mean and classifier counts, per-class cross-entropy.

Every state is a float64 (or int64) sum, so two accumulators over disjoint data merge by addition and the
result does not depend on how the data were chunked. Per-class sums use ``index_add_`` (O(N d)), never a
Python loop over classes. Inputs to ``update`` are already-validated float64 tensors ``H`` (n, d) and int64
class indices ``y`` (n,) in ``0..C-1`` on the accumulator's device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ncengine.errors import InputError

_F64 = torch.float64


def _zeros(*shape: int, device: torch.device | str | None, dtype: torch.dtype = _F64) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=device)


class ClassMeanAccumulator:
    """Pass 1: per-class counts, feature sums and squared-norm sums (float64).

    The number of classes grows on demand (``update`` with a larger class index pads the state), so a stream
    whose class count is not known in advance can be read once.

    Args:
        dim: feature dimension ``d``.
        num_classes: initial number of classes (grows as needed).
        device: torch device of the state.
    """

    def __init__(self, dim: int, num_classes: int = 0, device: torch.device | str | None = None) -> None:
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset(num_classes)

    def reset(self, num_classes: int = 0) -> None:
        """Restore the empty state."""
        C = int(num_classes)
        self.counts = _zeros(C, device=self.device, dtype=torch.int64)  # (C,)
        self.sum_h = _zeros(C, self.dim, device=self.device)  # (C, d)
        self.sum_sq_norm = _zeros(C, device=self.device)  # (C,)  sum_i ||h_i||^2 per class

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    def grow(self, num_classes: int) -> None:
        """Pad the state with empty classes up to ``num_classes``."""
        extra = int(num_classes) - self.num_classes
        if extra <= 0:
            return
        self.counts = torch.cat([self.counts, _zeros(extra, device=self.device, dtype=torch.int64)])
        self.sum_h = torch.cat([self.sum_h, _zeros(extra, self.dim, device=self.device)])
        self.sum_sq_norm = torch.cat([self.sum_sq_norm, _zeros(extra, device=self.device)])

    def update(self, H: torch.Tensor, y: torch.Tensor) -> None:
        """Add a chunk. ``H`` (n, d) float64, ``y`` (n,) int64 in ``0..``; classes grow as needed."""
        if y.numel() == 0:
            return
        self.grow(int(y.max()) + 1)
        self.counts.index_add_(0, y, torch.ones_like(y))
        self.sum_h.index_add_(0, y, H)
        self.sum_sq_norm.index_add_(0, y, (H * H).sum(dim=1))

    def merge(self, other: ClassMeanAccumulator) -> None:
        """Add another accumulator's state (disjoint data)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of dim {self.dim} and {other.dim}")
        C = max(self.num_classes, other.num_classes)
        self.grow(C)
        other_counts, other_sum, other_sq = _padded(other, C, self.device)
        self.counts += other_counts
        self.sum_h += other_sum
        self.sum_sq_norm += other_sq

    def permute(self, order: torch.Tensor) -> None:
        """Reorder classes: new class ``k`` is old class ``order[k]`` (used by label remapping)."""
        self.counts = self.counts[order]
        self.sum_h = self.sum_h[order]
        self.sum_sq_norm = self.sum_sq_norm[order]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts.clone(), "sum_h": self.sum_h.clone(), "sum_sq_norm": self.sum_sq_norm.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].to(self.device, torch.int64).clone()
        self.sum_h = state["sum_h"].to(self.device, _F64).clone()
        self.sum_sq_norm = state["sum_sq_norm"].to(self.device, _F64).clone()

    def compute(self) -> ClassMeans:
        """Freeze the class means. Raises InputError (field ``labels``) if a class has no samples."""
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise InputError("labels", f"class(es) {empty[:20]} have no samples",
                             expected="every class 0..C-1 to occur at least once")
        n = self.counts.to(_F64)
        return ClassMeans(mu=self.sum_h / n[:, None], counts=self.counts.clone(),
                          mean_sq_norm=self.sum_sq_norm / n)


def _padded(acc: ClassMeanAccumulator, C: int, device: torch.device):
    pad = C - acc.num_classes
    counts, sum_h, sq = acc.counts.to(device), acc.sum_h.to(device), acc.sum_sq_norm.to(device)
    if pad:
        counts = torch.cat([counts, _zeros(pad, device=device, dtype=torch.int64)])
        sum_h = torch.cat([sum_h, _zeros(pad, acc.dim, device=device)])
        sq = torch.cat([sq, _zeros(pad, device=device)])
    return counts, sum_h, sq


@dataclass(frozen=True)
class ClassMeans:
    """Frozen result of pass 1.

    Attributes:
        mu: (C, d) float64 class means ``mu_c``.
        counts: (C,) int64 samples per class ``n_c``.
        mean_sq_norm: (C,) float64 ``(1/n_c) sum_{i in c} ||h_i||^2``.
    """

    mu: torch.Tensor
    counts: torch.Tensor
    mean_sq_norm: torch.Tensor

    def fingerprint(self) -> str:
        """A hash of the means, computed once (pass-2 accumulators refuse to merge across different means)."""
        return hashlib.sha256(self.mu.detach().cpu().numpy().tobytes()).hexdigest()[:16]


class CenteredAccumulator:
    """Pass 2: statistics centred on frozen class means, plus the cosine and classifier sums.

    State (all sums over the samples seen, float64 unless noted):
        ``ss_within`` (C,): ``sum_{i in c} ||h_i - mu_c||^2``;
        ``proj_sq`` (r,): ``sum_i ((h_i - mu_{y_i}) . u_k)^2`` for the orthonormal basis ``U`` (d, r) of the
        range of ``Sigma_B`` (so ``Tr(Sigma_W pinv(Sigma_B)) = (1/N) sum_k proj_sq_k / lambda_k``);
        ``unit_sum[view]`` (C, d'): ``sum_{i in c, h_i != 0} h_i/||h_i||`` per cosine view (raw, centred, folded);
        ``unit_count[view]`` (C,) int64: rows that entered that sum; ``zero_norm[view]`` int: rows left out;
        ``ncc_correct``, ``ncc_cos_correct`` int; with a classifier: ``loss_sum`` (C,), ``clf_correct`` (C,)
        int64, ``agree`` int.

    Args:
        means: the frozen pass-1 result.
        mu_G: (d,) float64 global mean.
        U: (d, r) float64 orthonormal basis of the range of ``Sigma_B``.
        W: optional (C, d) float64 classifier weights; ``b``: optional (C,) float64 bias.
        center_cos: also accumulate cosines of ``h - mu_G`` (``center="global_mean"``).
    """

    def __init__(self, means: ClassMeans, mu_G: torch.Tensor, U: torch.Tensor, W: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, *, center_cos: bool = False) -> None:
        self.means = means
        self._fingerprint = means.fingerprint()
        self.mu = means.mu  # (C, d)
        self.mu_G = mu_G  # (d,)
        self.U = U  # (d, r)
        self.W = W  # (C, d) or None
        self.b = b  # (C,) or None
        self.center_cos = center_cos
        self.device = self.mu.device
        C, d = self.mu.shape
        self.num_classes, self.dim = int(C), int(d)
        # Precomputed, (C, C): mu_c . mu_k, used for exact distances from the centred rows.
        self._mu_mu = self.mu @ self.mu.T
        M = self.mu - self.mu_G  # (C, d)
        self._M_norm = M.norm(dim=1)  # (C,)
        self._mu_norm = self.mu.norm(dim=1)  # (C,)
        self._M = M
        self.views = ["raw"] + (["centered"] if center_cos else []) + (["folded"] if W is not None and b is not None
                                                                        else [])
        self.reset()

    def reset(self) -> None:
        """Restore the empty state (the frozen means are kept)."""
        C, d, dev = self.num_classes, self.dim, self.device
        self.num_samples = 0
        self.ss_within = _zeros(C, device=dev)
        self.proj_sq = _zeros(self.U.shape[1], device=dev)
        self.unit_sum = {v: _zeros(C, d + (1 if v == "folded" else 0), device=dev) for v in self.views}
        self.unit_count = {v: _zeros(C, device=dev, dtype=torch.int64) for v in self.views}
        self.zero_norm = {v: 0 for v in self.views}
        self.ncc_correct = 0
        self.ncc_cos_correct = 0
        self.loss_sum = _zeros(C, device=dev)
        self.clf_correct = _zeros(C, device=dev, dtype=torch.int64)
        self.agree = 0

    def _unit(self, view: str, X: torch.Tensor, y: torch.Tensor) -> None:
        norms = X.norm(dim=1)  # (n,)
        nz = norms > 0
        n_zero = int((~nz).sum())
        if n_zero:
            X, y, norms = X[nz], y[nz], norms[nz]
            self.zero_norm[view] += n_zero
        self.unit_sum[view].index_add_(0, y, X / norms[:, None])
        self.unit_count[view].index_add_(0, y, torch.ones_like(y))

    def update(self, H: torch.Tensor, y: torch.Tensor) -> None:
        """Add a chunk: ``H`` (n, d) float64, ``y`` (n,) int64 in ``0..C-1``."""
        n = int(y.numel())
        if n == 0:
            return
        self.num_samples += n
        D = H - self.mu[y]  # (n, d) centred on the frozen class means
        self.ss_within.index_add_(0, y, (D * D).sum(dim=1))
        P = D @ self.U  # (n, r)
        self.proj_sq += (P * P).sum(dim=0)

        # Nearest class mean, Euclidean: ||h - mu_c||^2 = ||D||^2 + 2 D.(mu_y - mu_c) + ||mu_y - mu_c||^2,
        # the ||D||^2 term being common to all c. Written from the centred rows (no large-number cancellation).
        Dmu = D @ self.mu.T  # (n, C)  D . mu_c
        Dy = Dmu.gather(1, y[:, None])  # (n, 1)  D . mu_y
        mm = self._mu_mu
        mu_diag = mm.diagonal()
        dist_sq_mu = mu_diag[y][:, None] - 2 * mm[y] + mu_diag[None, :]  # (n, C)  ||mu_y - mu_c||^2
        dist = 2 * (Dy - Dmu) + dist_sq_mu  # (n, C)  ||h - mu_c||^2 - ||D||^2
        ncc_pred = dist.argmin(dim=1)
        self.ncc_correct += int((ncc_pred == y).sum())

        # Nearest class mean by cosine: argmax_c cos(h~, mu~_c), tilde = raw or centred on mu_G.
        if self.center_cos:
            Hc = H - self.mu_G
            score = (Hc @ self._M.T) / self._M_norm  # (n, C)
            self._unit("centered", Hc, y)
        else:
            hm = Dmu + mm[y]  # (n, C)  h . mu_c
            score = hm / self._mu_norm
        score = torch.nan_to_num(score, nan=-torch.inf)
        self.ncc_cos_correct += int((score.argmax(dim=1) == y).sum())

        self._unit("raw", H, y)
        if "folded" in self.views:
            sq = (H * H).sum(dim=1)
            inv = torch.rsqrt(sq + 1.0)  # (n,)  1/||[h, 1]||, never zero
            self.unit_sum["folded"][:, : self.dim].index_add_(0, y, H * inv[:, None])
            self.unit_sum["folded"][:, self.dim].index_add_(0, y, inv)
            self.unit_count["folded"].index_add_(0, y, torch.ones_like(y))

        if self.W is not None:
            logits = H @ self.W.T  # (n, C)
            if self.b is not None:
                logits = logits + self.b
            ce = torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None]).squeeze(1)  # (n,)
            self.loss_sum.index_add_(0, y, ce)
            pred = logits.argmax(dim=1)
            self.clf_correct.index_add_(0, y, (pred == y).to(torch.int64))
            self.agree += int((pred == ncc_pred).sum())

    def merge(self, other: CenteredAccumulator) -> None:
        """Add another pass-2 accumulator's state; both must be built on the same frozen means."""
        if other._fingerprint != self._fingerprint or other.views != self.views:
            raise ValueError("cannot merge pass-2 accumulators built on different class means or options")
        self.num_samples += other.num_samples
        self.ss_within += other.ss_within.to(self.device)
        self.proj_sq += other.proj_sq.to(self.device)
        for v in self.views:
            self.unit_sum[v] += other.unit_sum[v].to(self.device)
            self.unit_count[v] += other.unit_count[v].to(self.device)
            self.zero_norm[v] += other.zero_norm[v]
        self.ncc_correct += other.ncc_correct
        self.ncc_cos_correct += other.ncc_cos_correct
        self.loss_sum += other.loss_sum.to(self.device)
        self.clf_correct += other.clf_correct.to(self.device)
        self.agree += other.agree


class HeldOutAccumulator:
    """NC4 on a held-out split with the training split's class means and classifier.

    Counts, over the held-out samples: Euclidean and cosine nearest-class-mean hits, classifier hits and
    NCC/classifier agreement. ``mu`` (C, d), ``mu_G`` (d,), ``W`` (C, d) | None, ``b`` (C,) | None, float64.
    """

    def __init__(self, mu: torch.Tensor, mu_G: torch.Tensor, W: torch.Tensor | None, b: torch.Tensor | None,
                 *, center_cos: bool = False) -> None:
        self.mu, self.mu_G, self.W, self.b, self.center_cos = mu, mu_G, W, b, center_cos
        self._mu_sq = (mu * mu).sum(dim=1)  # (C,)
        ref = mu - mu_G if center_cos else mu
        self._ref = ref
        self._ref_norm = ref.norm(dim=1)
        self.num_samples = 0
        self.ncc_correct = 0
        self.ncc_cos_correct = 0
        self.clf_correct = 0
        self.agree = 0

    def update(self, H: torch.Tensor, y: torch.Tensor) -> None:
        n = int(y.numel())
        if n == 0:
            return
        self.num_samples += n
        dist = self._mu_sq[None, :] - 2 * (H @ self.mu.T)  # (n, C)  ||h - mu_c||^2 - ||h||^2
        ncc_pred = dist.argmin(dim=1)
        self.ncc_correct += int((ncc_pred == y).sum())
        X = H - self.mu_G if self.center_cos else H
        score = torch.nan_to_num((X @ self._ref.T) / self._ref_norm, nan=-torch.inf)
        self.ncc_cos_correct += int((score.argmax(dim=1) == y).sum())
        if self.W is not None:
            logits = H @ self.W.T
            if self.b is not None:
                logits = logits + self.b
            pred = logits.argmax(dim=1)
            self.clf_correct += int((pred == y).sum())
            self.agree += int((pred == ncc_pred).sum())


def range_basis(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the range of ``Sigma_B = (1/C) M^T M``, truncated explicitly to ``rank``.

    Args:
        M: (C, d) float64 centred class means ``mu_c - mu_G``.
        rank: the number of directions to keep (``min(C - 1, d)`` for NC1, Papyan et al. 2020).

    Returns:
        ``(U, lam)``: ``U`` (d, r) float64 with orthonormal columns and ``lam`` (r,) the matching eigenvalues of
        ``Sigma_B`` in decreasing order. Directions whose eigenvalue is exactly zero or below
        ``C * d * eps * lam_max`` (numerically absent: the means span fewer than ``rank`` dimensions) are
        dropped, so ``r <= rank``.
    """
    C = M.shape[0]
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)  # S (min(C,d),), Vh (min(C,d), d)
    lam = S * S / C  # eigenvalues of Sigma_B
    r = min(int(rank), int(lam.numel()))
    lam, V = lam[:r], Vh[:r].T
    if r and float(lam[0]) > 0:
        keep = lam > lam[0] * (max(M.shape) * C * np.finfo(np.float64).eps)
    else:
        keep = lam > 0
    return V[:, keep].contiguous(), lam[keep].contiguous()

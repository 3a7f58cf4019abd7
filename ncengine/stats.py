"""Streaming float64 accumulators for the Neural Collapse statistics.

Two passes, as in DESIGN.md §1 (and the accumulator pattern of rhubarbwu/neural-collapse and torchmetrics):

* pass 1, :class:`ClassMeanAccumulator`: per-class sample counts, feature sums, squared-norm sums and sums of
  unit-normalised features (the cosine measures, thesis Lemma 2.4.4), from which the class means ``mu_c`` are
  fixed;
* pass 2, :class:`CenteredAccumulator`: statistics centred on those frozen means (within-class scatter, its
  projection on the rank-(C-1) range of ``Sigma_B``), nearest-class-mean and classifier counts, per-class
  cross-entropy.

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
    """Pass 1: per-class counts, feature sums, squared-norm sums and sums of unit-normalised features (float64).

    The unit-vector sums need no class means, so the raw-feature cosine measures (thesis Lemma 2.4.4) are
    accumulated here, in the same pass: ``unit_sum`` (C, d) ``= sum_{i in c, h_i != 0} h_i / ||h_i||`` with
    ``unit_count`` (C,) rows and ``zero_norm`` rows left out; with ``fold=True`` also the folded features
    ``[h, 1] / ||[h, 1]||`` (``fold_sum`` (C, d + 1)), used for the bound of a biased classifier.

    The number of classes grows on demand (``update`` with a larger class index pads the state), so a stream
    whose class count is not known in advance can be read once.

    Args:
        dim: feature dimension ``d``.
        num_classes: initial number of classes (grows as needed).
        device: torch device of the state.
        fold: also accumulate the folded unit vectors.
    """

    _STATE = ("counts", "sum_h", "sum_sq_norm", "unit_sum", "unit_count", "fold_sum")

    def __init__(self, dim: int, num_classes: int = 0, device: torch.device | str | None = None, *,
                 fold: bool = False) -> None:
        self.dim = int(dim)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.fold = fold
        self.reset(num_classes)

    def reset(self, num_classes: int = 0) -> None:
        """Restore the empty state."""
        C, d, dev = int(num_classes), self.dim, self.device
        self.counts = _zeros(C, device=dev, dtype=torch.int64)  # (C,)
        self.sum_h = _zeros(C, d, device=dev)  # (C, d)
        self.sum_sq_norm = _zeros(C, device=dev)  # (C,)  sum_i ||h_i||^2 per class
        self.unit_sum = _zeros(C, d, device=dev)  # (C, d)
        self.unit_count = _zeros(C, device=dev, dtype=torch.int64)  # (C,)
        self.fold_sum = _zeros(C, d + 1 if self.fold else 0, device=dev)  # (C, d + 1) or (C, 0)
        self.zero_norm = 0

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    def grow(self, num_classes: int) -> None:
        """Pad the state with empty classes up to ``num_classes``."""
        extra = int(num_classes) - self.num_classes
        if extra <= 0:
            return
        for name in self._STATE:
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, torch.zeros((extra, *t.shape[1:]), dtype=t.dtype, device=t.device)]))

    def update(self, H: torch.Tensor, y: torch.Tensor, norms: torch.Tensor | None = None) -> None:
        """Add a chunk. ``H`` (n, d) float64, ``y`` (n,) int64 in ``0..`` (classes grow as needed), ``norms``
        optional precomputed ``||h_i||`` (n,)."""
        if y.numel() == 0:
            return
        self.grow(int(y.max()) + 1)
        if norms is None:
            norms = torch.linalg.vector_norm(H, dim=1)  # (n,)
        sq = norms * norms
        self.counts.index_add_(0, y, torch.ones_like(y))
        self.sum_h.index_add_(0, y, H)
        self.sum_sq_norm.index_add_(0, y, sq)
        nz = norms > 0
        if bool(nz.all()):
            self.unit_sum.index_add_(0, y, H / norms[:, None])
            self.unit_count.index_add_(0, y, torch.ones_like(y))
        else:
            self.zero_norm += int((~nz).sum())
            self.unit_sum.index_add_(0, y[nz], H[nz] / norms[nz, None])
            self.unit_count.index_add_(0, y[nz], torch.ones_like(y[nz]))
        if self.fold:
            inv = torch.rsqrt(sq + 1.0)  # (n,)  1/||[h, 1]||, never zero
            self.fold_sum[:, : self.dim].index_add_(0, y, H * inv[:, None])
            self.fold_sum[:, self.dim].index_add_(0, y, inv)

    def merge(self, other: ClassMeanAccumulator) -> None:
        """Add another accumulator's state (disjoint data)."""
        if other.dim != self.dim or other.fold != self.fold:
            raise ValueError(f"cannot merge accumulators of dim/fold {self.dim}/{self.fold} and {other.dim}/{other.fold}")
        self.grow(other.num_classes)
        other.grow(self.num_classes)
        for name in self._STATE:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.zero_norm += other.zero_norm

    def permute(self, order: torch.Tensor) -> None:
        """Reorder classes: new class ``k`` is old class ``order[k]`` (used by label remapping)."""
        for name in self._STATE:
            setattr(self, name, getattr(self, name)[order])

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        out: dict[str, torch.Tensor | int] = {name: getattr(self, name).clone() for name in self._STATE}
        out["zero_norm"] = self.zero_norm
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        for name in self._STATE:
            ref = getattr(self, name)
            setattr(self, name, state[name].to(self.device, ref.dtype).clone())
        self.zero_norm = int(state["zero_norm"])

    def compute(self) -> ClassMeans:
        """Freeze the class means. Raises InputError (field ``labels``) if a class has no samples."""
        empty = (self.counts == 0).nonzero().flatten().tolist()
        if empty:
            raise InputError("labels", f"class(es) {empty[:20]} have no samples",
                             expected="every class 0..C-1 to occur at least once")
        n = self.counts.to(_F64)
        return ClassMeans(mu=self.sum_h / n[:, None], counts=self.counts.clone(),
                          mean_sq_norm=self.sum_sq_norm / n)


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
    """Pass 2: statistics centred on frozen class means, nearest-class-mean and classifier counts.

    State (sums over the samples seen, float64 unless noted):
        ``ss_within`` (C,): ``sum_{i in c} ||h_i - mu_c||^2``;
        ``proj_sq`` (r,): ``sum_i ((h_i - mu_{y_i}) . u_k)^2`` for the orthonormal basis ``U`` (d, r) of the
        range of ``Sigma_B`` (so ``Tr(Sigma_W pinv(Sigma_B)) = (1/N) sum_k proj_sq_k / lambda_k``);
        ``ncc_correct``, ``ncc_cos_correct`` int; with a classifier ``loss_sum`` (C,) cross-entropy,
        ``clf_correct`` (C,) int64, ``agree`` int (classifier == NCC); with ``center_cos`` the unit-vector sums
        of ``h - mu_G`` (``unit_sum`` (C, d), ``unit_count`` (C,), ``zero_norm``).

    Everything is computed from the centred rows ``D = H - mu_y`` and one matrix product
    ``D @ [U | mu^T | W^T]`` (O(N d C)): ``h . mu_c = D . mu_c + mu_y . mu_c`` and ``h . w_c = D . w_c + mu_y . w_c``,
    and the Euclidean NCC uses ``||h - mu_c||^2 - ||h - mu_y||^2 = ||mu_y - mu_c||^2 - 2 D . (mu_c - mu_y)``, which
    has no large-number cancellation when the features are collapsed.

    Args:
        means: the frozen pass-1 result.
        mu_G: (d,) float64 global mean.
        U: (d, r) float64 orthonormal basis of the range of ``Sigma_B``.
        W: optional (C, d) float64 classifier weights; ``b``: optional (C,) float64 bias.
        center_cos: accumulate the cosine sums and the cosine NCC of ``h - mu_G`` (``center="global_mean"``);
            otherwise the cosine NCC uses the raw features.
    """

    def __init__(self, means: ClassMeans, mu_G: torch.Tensor, U: torch.Tensor, W: torch.Tensor | None = None,
                 b: torch.Tensor | None = None, *, center_cos: bool = False) -> None:
        self.means = means
        self._fingerprint = means.fingerprint()
        self.mu = mu = means.mu  # (C, d)
        self.mu_G, self.U, self.W, self.b = mu_G, U, W, b
        self.center_cos = center_cos
        self.device = mu.device
        C, d = mu.shape
        self.num_classes, self.dim = int(C), int(d)
        self.r = int(U.shape[1])
        cols = [U, mu.T] + ([W.T] if W is not None else [])
        self._B = torch.cat(cols, dim=1).contiguous()  # (d, r + C [+ C])
        mm = mu @ mu.T  # (C, C)  mu_y . mu_c
        self._mm = mm
        diag = mm.diagonal()
        self._mu_dist2 = ((mu[:, None, :] - mu[None, :, :]) ** 2).sum(-1) if C <= 512 else \
            (diag[:, None] - 2 * mm + diag[None, :]).clamp_min(0)  # (C, C) ||mu_y - mu_c||^2
        if center_cos:
            M = mu - mu_G
            self._ref_norm = M.norm(dim=1)  # (C,)
            self._M = M
        else:
            self._ref_norm = mu.norm(dim=1)
        self._ref_ok = bool((self._ref_norm > 0).all())
        if W is not None:
            muW = mu @ W.T  # (C, C)  mu_y . w_c
            self._muWb = muW + b if b is not None else muW
        self.reset()

    def reset(self) -> None:
        """Restore the empty state (the frozen means are kept)."""
        C, d, dev = self.num_classes, self.dim, self.device
        self.num_samples = 0
        self.ss_within = _zeros(C, device=dev)
        self.proj_sq = _zeros(self.r, device=dev)
        self.unit_sum = _zeros(C, d, device=dev)
        self.unit_count = _zeros(C, device=dev, dtype=torch.int64)
        self.zero_norm = 0
        self.ncc_correct = 0
        self.ncc_cos_correct = 0
        self.loss_sum = _zeros(C, device=dev)
        self.clf_correct = _zeros(C, device=dev, dtype=torch.int64)
        self.agree = 0

    def update(self, H: torch.Tensor, y: torch.Tensor) -> None:
        """Add a chunk: ``H`` (n, d) float64, ``y`` (n,) int64 in ``0..C-1``. ``H`` is not modified."""
        n = int(y.numel())
        if n == 0:
            return
        C, r = self.num_classes, self.r
        self.num_samples += n
        D = H - self.mu.index_select(0, y)  # (n, d) centred on the frozen class means
        dn = torch.linalg.vector_norm(D, dim=1)  # (n,)
        self.ss_within.index_add_(0, y, dn * dn)
        Z = D @ self._B  # (n, r + C [+ C])
        P = Z[:, :r]  # (n, r) projections on the range of Sigma_B
        self.proj_sq += (P * P).sum(dim=0)
        Dmu = Z[:, r:r + C]  # (n, C)  D . mu_c

        # Euclidean NCC: argmin_c ||mu_y - mu_c||^2 - 2 D . mu_c  (the dropped terms do not depend on c)
        ncc_pred = torch.add(self._mu_dist2.index_select(0, y), Dmu, alpha=-2.0).argmin(dim=1)
        self.ncc_correct += int((ncc_pred == y).sum())

        # Cosine NCC: argmax_c  h~ . ref_c / ||ref_c||
        if self.center_cos:
            Hc = H - self.mu_G  # (n, d)
            X = Hc @ self._M.T  # (n, C)
            hn = torch.linalg.vector_norm(Hc, dim=1)
            nz = hn > 0
            if not bool(nz.all()):
                self.zero_norm += int((~nz).sum())
                Hc, yk, hn = Hc[nz], y[nz], hn[nz]
            else:
                yk = y
            self.unit_sum.index_add_(0, yk, Hc / hn[:, None])
            self.unit_count.index_add_(0, yk, torch.ones_like(yk))
        else:
            X = Dmu + self._mm.index_select(0, y)  # (n, C)  h . mu_c
        score = X / self._ref_norm
        if not self._ref_ok:
            score = torch.nan_to_num(score, nan=-torch.inf)
        self.ncc_cos_correct += int((score.argmax(dim=1) == y).sum())

        if self.W is not None:
            logits = Z[:, r + C:] + self._muWb.index_select(0, y)  # (n, C)  h . w_c + b_c
            ce = torch.logsumexp(logits, dim=1) - logits.gather(1, y[:, None]).squeeze(1)  # (n,)
            self.loss_sum.index_add_(0, y, ce)
            pred = logits.argmax(dim=1)
            self.clf_correct.index_add_(0, y, (pred == y).to(torch.int64))
            self.agree += int((pred == ncc_pred).sum())

    def merge(self, other: CenteredAccumulator) -> None:
        """Add another pass-2 accumulator's state; both must be built on the same frozen means and options."""
        if other._fingerprint != self._fingerprint or other.center_cos != self.center_cos or \
                (other.W is None) != (self.W is None):
            raise ValueError("cannot merge pass-2 accumulators built on different class means or options")
        self.num_samples += other.num_samples
        for name in ("ss_within", "proj_sq", "unit_sum", "unit_count", "loss_sum", "clf_correct"):
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.zero_norm += other.zero_norm
        self.ncc_correct += other.ncc_correct
        self.ncc_cos_correct += other.ncc_cos_correct
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
    V, S, _ = torch.linalg.svd(M.T, full_matrices=False)  # V (d, k), S (k,), k = min(C, d); M^T is tall
    lam = S * S / C  # eigenvalues of Sigma_B, decreasing
    r = min(int(rank), int(lam.numel()))
    lam, V = lam[:r], V[:, :r]
    if r and float(lam[0]) > 0:
        keep = lam > lam[0] * (max(M.shape) * C * np.finfo(np.float64).eps)
    else:
        keep = lam > 0
    return V[:, keep].contiguous(), lam[keep].contiguous()

"""Streaming float64 accumulators for the Neural Collapse statistics.

Two passes, as in DESIGN.md §1 (and the accumulator pattern of rhubarbwu/neural-collapse and torchmetrics):

* pass 1, :class:`ClassMeanAccumulator`: per-class sample counts, feature sums, squared-norm sums and sums of
  unit-normalised features (the cosine measures, thesis Lemma 2.4.4), from which the class means ``mu_c`` are
  fixed;
* pass 2, :class:`CenteredAccumulator`: statistics centred on those frozen means (within-class scatter, its
  projection on the rank-(C-1) range of ``Sigma_B``), nearest-class-mean and classifier counts, per-class
  cross-entropy.

Every state is a float64 (or int64) sum, so two accumulators over disjoint data merge by addition and the
result does not depend on how the data were chunked (up to float64 rounding). Per-class sums of rows use
``index_put_(..., accumulate=True)`` (O(N d), in row order on the CPU: much faster there than ``index_add_``, which
dispatches per row), per-class sums of scalars ``bincount(weights=...)``; never a Python loop over classes. Inputs
to ``update`` are already-validated float64 tensors ``H`` (n, d) and int64 class indices ``y`` (n,) in
``0..C-1`` on the accumulator's device. Chunk-sized scratch buffers are allocated once per accumulator and
reused, so a long stream does not fault fresh pages in for every chunk.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ncengine.errors import InputError

_F64 = torch.float64


def _zeros(*shape: int, device: torch.device | str | None, dtype: torch.dtype = _F64) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


def _class_sum_(out: torch.Tensor, y: torch.Tensor, X: torch.Tensor) -> None:
    """``out[c] += sum_{i: y_i = c} X[i]`` in place; ``out`` (C, d) (may be a strided view), ``X`` (n, d)."""
    out.index_put_((y,), X, accumulate=True)


def _class_count(y: torch.Tensor, C: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class count (int64) or per-class sum of ``weights`` (n,) (float64), shape (C,)."""
    return torch.bincount(y, weights=weights, minlength=C)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run small dense factorisations (SVD of a (d, C) matrix, C x C products) on one thread.

    Their many tiny parallel regions cost far more than they save on a busy 2-core machine (measured: a
    512 x 100 SVD took ~0.3 s on 2 threads under load, ~4 ms on one). The previous setting is restored.
    """
    global _one_thread_users, _one_thread_saved
    with _one_thread_lock:  # concurrent callers (threads of one server) must not restore each other's setting
        if _one_thread_users == 0:
            _one_thread_saved = torch.get_num_threads()
            if _one_thread_saved > 1:
                torch.set_num_threads(1)
        _one_thread_users += 1
    try:
        yield
    finally:
        with _one_thread_lock:
            _one_thread_users -= 1
            if _one_thread_users == 0 and _one_thread_saved > 1:
                torch.set_num_threads(_one_thread_saved)


_one_thread_lock = threading.Lock()
_one_thread_users = 0
_one_thread_saved = 1


class _Scratch:
    """Named chunk-sized float64 buffers, allocated once (grown when a larger chunk arrives) and reused."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = torch.empty(max(rows, 1), cols, dtype=_F64, device=self.device)
            self._bufs[name] = buf
        return buf[:rows]


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
        self._scratch = _Scratch(self.device)
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

    def update(self, H: torch.Tensor, y: torch.Tensor, norms: torch.Tensor | None = None, *,
               overwrite: bool = False) -> None:
        """Add a chunk. ``H`` (n, d) float64, ``y`` (n,) int64 in ``0..`` (classes grow as needed), ``norms``
        optional precomputed ``||h_i||`` (n,). ``H`` is not modified unless ``overwrite=True`` (then it is used
        as scratch space, which saves a chunk-sized buffer)."""
        n = int(y.numel())
        if n == 0:
            return
        self.grow(int(y.max()) + 1)
        C, d = self.num_classes, self.dim
        if norms is None:
            norms = torch.linalg.vector_norm(H, dim=1)  # (n,)
        sq = norms * norms
        self.counts += _class_count(y, C)
        _class_sum_(self.sum_h, y, H)
        self.sum_sq_norm += _class_count(y, C, sq)
        # unit vectors h / ||h||; a zero row is left out (weight 0: it adds nothing to the sum) and counted
        nz = norms > 0
        n_nz = int(nz.sum())
        inv = torch.where(nz, 1.0 / torch.where(nz, norms, 1.0), 0.0)  # (n,)
        buf = H if overwrite else self._scratch.get("scaled", n, d)
        _class_sum_(self.unit_sum, y, torch.mul(H, inv[:, None], out=buf))  # buf = h / ||h||
        if n_nz == n:
            self.unit_count += _class_count(y, C)
        else:
            self.zero_norm += n - n_nz
            self.unit_count += _class_count(y[nz], C)
        if self.fold:
            inv_f = torch.rsqrt(sq + 1.0)  # (n,)  1/||[h, 1]||, never zero
            # h / ||[h, 1]|| = (h / ||h||) * (||h|| / ||[h, 1]||); a zero row stays zero
            _class_sum_(self.fold_sum[:, :d], y, buf.mul_((norms * inv_f)[:, None]))
            self.fold_sum[:, d] += _class_count(y, C, inv_f)

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

    Everything is computed from the centred rows ``D = H - mu_y`` and ONE matrix product per chunk,
    ``Z = D @ [V | mu_G | W^T]`` (O(N d C)), where ``M^T = V diag(S) Vh`` is the thin SVD of the centred means
    (``V`` (d, k), ``k <= min(C, d)``; directions with ``S_j <= S_max max(C, d) eps`` carry nothing and are
    left out). Then

    * ``D . (mu_c - mu_G) = (D V) diag(S) Vh`` (an (n, k) @ (k, C) product, k/d of the big one's cost);
    * the NC1 projections ``D U`` are columns of ``D V`` (``U`` from :func:`range_basis` is a subset of ``V``'s
      columns, up to sign; any other ``U`` is projected through ``V`` or, if it leaves the range of ``V``,
      appended to the product);
    * ``h . mu_c = D . (mu_c - mu_G) + D . mu_G + mu_y . mu_c`` and ``h . w_c = D . w_c + mu_y . w_c``;
    * the Euclidean NCC uses ``||h - mu_c||^2 - ||h - mu_y||^2 = ||mu_y - mu_c||^2 - 2 D . (mu_c - mu_y)``
      (the terms that do not depend on c dropped), which has no large-number cancellation when the features
      are collapsed.

    So the big product has ``k + 1 + C`` columns instead of ``r + 2C``, and the centred rows are formed once.

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
        self.r = r = int(U.shape[1])
        with _one_thread():  # small dense algebra: one thread is faster (see _one_thread)
            M = mu - mu_G  # (C, d)
            self._M = M

            # thin SVD of M^T: D @ M^T = (D @ V) @ (S Vh), with the directions that carry nothing left out
            V, S, Vh = torch.linalg.svd(M.T.contiguous(), full_matrices=False)  # V (d, k), S (k,), Vh (k, C)
            smax = float(S[0]) if S.numel() else 0.0
            keep = S > smax * max(C, d) * np.finfo(np.float64).eps if smax > 0 else S > 0
            V, S, Vh = V[:, keep], S[keep], Vh[keep]
            k = int(V.shape[1])
            self._SVh = (S[:, None] * Vh).contiguous()  # (k, C)

            # the NC1 projections D @ U through V: a column selection when U's columns are V's (up to sign)
            cols = [V]
            self._proj_idx: torch.Tensor | None = None
            self._proj_mat: torch.Tensor | None = None
            self._proj_col0 = 0
            Q = V.T @ U  # (k, r)
            in_range = r == 0 or float(torch.linalg.matrix_norm(U - V @ Q)) <= 1e-12 * max(1.0, r ** 0.5)
            if in_range and r:
                j = Q.abs().argmax(dim=0)  # (r,)
                sel = torch.zeros_like(Q)
                sel[j, torch.arange(r, device=Q.device)] = torch.sign(Q[j, torch.arange(r, device=Q.device)])
                if float((Q - sel).abs().max()) <= 1e-13 and int(torch.unique(j).numel()) == r:
                    self._proj_idx = j
                else:
                    self._proj_mat = Q.contiguous()
            elif r:
                self._proj_col0 = sum(int(c.shape[1]) for c in cols) + (0 if center_cos else 1) + \
                    (C if W is not None else 0)
            self._k = k
            if not center_cos:
                cols.append(mu_G[:, None])  # D . mu_G, for h . mu_c
            self._w_col0 = sum(int(c.shape[1]) for c in cols)
            if W is not None:
                cols.append(W.T)
            if r and not in_range:
                cols.append(U)
            self._B = torch.cat(cols, dim=1).contiguous()  # (d, k [+ 1] [+ C] [+ r])

            mm = mu @ mu.T  # (C, C)  mu_y . mu_c
            self._mm = mm
            diag = mm.diagonal()
            # (C, C) ||mu_y - mu_c||^2, from the differences (no cancellation) up to a few thousand classes
            self._mu_dist2 = torch.cdist(mu, mu, compute_mode="donot_use_mm_for_euclid_dist").square_() if C <= 4096 \
                else (diag[:, None] - 2 * mm + diag[None, :]).clamp_min(0)
            # Euclidean NCC score: ||mu_y - mu_c||^2 - 2 D . (mu_c - mu_G)  (differs from the distance by terms
            # that do not depend on c)
            if center_cos:
                self._ref_norm = M.norm(dim=1)  # (C,)
                self._cos_off = M @ M.T  # (C, C)  (mu_y - mu_G) . (mu_c - mu_G)
            else:
                self._ref_norm = mu.norm(dim=1)
                self._cos_off = mm
            self._ref_ok = bool((self._ref_norm > 0).all())
            if W is not None:
                muW = mu @ W.T  # (C, C)  mu_y . w_c
                self._muWb = muW + b if b is not None else muW
        self._scratch = _Scratch(self.device)
        self.reset()

    def spawn(self) -> CenteredAccumulator:
        """An empty accumulator on the same frozen means and tables (no refactorisation), for another worker;
        merge it back with :meth:`merge`."""
        other = copy.copy(self)
        other._scratch = _Scratch(self.device)
        other.reset()
        return other

    def reset(self) -> None:
        """Restore the empty state (the frozen means are kept)."""
        C, d, dev = self.num_classes, self.dim, self.device
        self.num_samples = 0
        self.ss_within = _zeros(C, device=dev)
        self.proj_sq = _zeros(self.r, device=dev)
        self.unit_sum = _zeros(C, d, device=dev)
        self.unit_count = _zeros(C, device=dev, dtype=torch.int64)
        self.zero_norm = 0
        self._ncc_correct = _zeros(device=dev, dtype=torch.int64)
        self._ncc_cos_correct = _zeros(device=dev, dtype=torch.int64)
        self.loss_sum = _zeros(C, device=dev)
        self.clf_correct = _zeros(C, device=dev, dtype=torch.int64)
        self._agree = _zeros(device=dev, dtype=torch.int64)

    @property
    def ncc_correct(self) -> int:
        """Samples whose Euclidean nearest class mean is their label."""
        return int(self._ncc_correct)

    @property
    def ncc_cos_correct(self) -> int:
        """Samples whose cosine-nearest class mean is their label."""
        return int(self._ncc_cos_correct)

    @property
    def agree(self) -> int:
        """Samples where the classifier and the Euclidean NCC predict the same class (0 without a classifier)."""
        return int(self._agree)

    def update(self, H: torch.Tensor, y: torch.Tensor) -> None:
        """Add a chunk: ``H`` (n, d) float64, ``y`` (n,) int64 in ``0..C-1``. ``H`` is not modified."""
        n = int(y.numel())
        if n == 0:
            return
        C, d, k = self.num_classes, self.dim, self._k
        self.num_samples += n
        D = torch.index_select(self.mu, 0, y, out=self._scratch.get("D", n, d))
        D = torch.sub(H, D, out=D)  # (n, d) centred on the frozen class means
        dn = torch.linalg.vector_norm(D, dim=1)  # (n,)
        self.ss_within += _class_count(y, C, dn * dn)
        Z = torch.mm(D, self._B, out=self._scratch.get("Z", n, int(self._B.shape[1])))  # (n, k [+1] [+C] [+r])
        DV = Z[:, :k]  # (n, k)  D . v_j
        if self.r:
            if self._proj_idx is not None:  # column sums of squares of D V, then the U columns among them
                self.proj_sq += (DV * DV).sum(dim=0)[self._proj_idx]  # (r,)
            else:
                P = DV @ self._proj_mat if self._proj_mat is not None else \
                    Z[:, self._proj_col0:self._proj_col0 + self.r]
                self.proj_sq += (P * P).sum(dim=0)  # (r,)
        DM = DV @ self._SVh  # (n, C)  D . (mu_c - mu_G)
        G = self._scratch.get("G", n, C)  # (n, C) rows of C x C tables gathered by label

        # Euclidean NCC: argmin_c ||mu_y - mu_c||^2 - 2 D . (mu_c - mu_G)
        ncc_pred = torch.index_select(self._mu_dist2, 0, y, out=G).add_(DM, alpha=-2.0).argmin(dim=1)
        self._ncc_correct += (ncc_pred == y).sum()

        # Cosine NCC: argmax_c  h~ . ref_c / ||ref_c||
        if self.center_cos:
            X = DM.add_(torch.index_select(self._cos_off, 0, y, out=G))  # (n, C) (h - mu_G) . (mu_c - mu_G)
            Hc = torch.sub(H, self.mu_G, out=self._scratch.get("D", n, d))  # D is done: reuse its buffer
            hn = torch.linalg.vector_norm(Hc, dim=1)
            nz = hn > 0
            n_nz = int(nz.sum())
            inv = torch.where(nz, 1.0 / torch.where(nz, hn, 1.0), 0.0)
            _class_sum_(self.unit_sum, y, Hc.mul_(inv[:, None]))
            if n_nz == n:
                self.unit_count += _class_count(y, C)
            else:
                self.zero_norm += n - n_nz
                self.unit_count += _class_count(y[nz], C)
        else:
            X = DM.add_(Z[:, k:k + 1]).add_(torch.index_select(self._cos_off, 0, y, out=G))  # (n, C) h . mu_c
        score = X.div_(self._ref_norm)
        if not self._ref_ok:
            score = torch.nan_to_num(score, nan=-torch.inf)
        self._ncc_cos_correct += (score.argmax(dim=1) == y).sum()

        if self.W is not None:
            w0 = self._w_col0
            logits = Z[:, w0:w0 + C].add_(torch.index_select(self._muWb, 0, y, out=G))  # (n, C)  h . w_c + b_c
            pred = logits.argmax(dim=1)
            # cross-entropy as log(1 + sum_{j != y} e^{z_j - z_y}) = softplus(logsumexp_{j != y}(z_j - z_y)),
            # in place (logits are done after this): accurate to a few ulp of the loss itself, also when it is
            # ~1e-15 and logsumexp(z) - z_y would cancel to an absolute error of ~ulp(|z|)
            wrong = logits.sub_(logits.gather(1, y[:, None])).scatter_(1, y[:, None], -torch.inf)  # (n, C)
            top = wrong.amax(dim=1, keepdim=True)  # (n, 1), finite: C >= 2
            lse = wrong.sub_(top).exp_().sum(dim=1).log_().add_(top.squeeze(1))  # (n,)
            ce = lse.clamp_min(0.0).add_(lse.abs().neg_().exp_().log1p_())  # log(1 + e^lse), no overflow
            self.loss_sum += _class_count(y, C, ce)
            self.clf_correct += _class_count(y[pred == y], C)
            self._agree += (pred == ncc_pred).sum()

    def merge(self, other: CenteredAccumulator) -> None:
        """Add another pass-2 accumulator's state; both must be built on the same frozen means and options."""
        if other._fingerprint != self._fingerprint or other.center_cos != self.center_cos or \
                (other.W is None) != (self.W is None):
            raise ValueError("cannot merge pass-2 accumulators built on different class means or options")
        self.num_samples += other.num_samples
        for name in ("ss_within", "proj_sq", "unit_sum", "unit_count", "loss_sum", "clf_correct", "_ncc_correct",
                     "_ncc_cos_correct", "_agree"):
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.zero_norm += other.zero_norm


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
    # (a contiguous copy: LAPACK on the transposed view is much slower here)
    with _one_thread():
        V, S, _ = torch.linalg.svd(M.T.contiguous(), full_matrices=False)  # V (d, k), S (k,), k = min(C, d)
    lam = S * S / C  # eigenvalues of Sigma_B, decreasing
    r = min(int(rank), int(lam.numel()))
    lam, V = lam[:r], V[:, :r]
    if r and float(lam[0]) > 0:
        keep = lam > lam[0] * (max(M.shape) * C * np.finfo(np.float64).eps)
    else:
        keep = lam > 0
    return V[:, keep].contiguous(), lam[keep].contiguous()

"""Neural Collapse metrics: ``measure`` (every metric of DESIGN.md §1) and ``effective_depth``.

Conventions (written out per key in ``docs/metrics.md``):

* global mean ``mu_G`` = mean of the class means (Papyan et al. 2020); ``global_mean="sample"`` for the
  sample-weighted mean;
* cosine measures (``intra_cos``, ``inter_cos``, ``ncc_cos_accuracy``) use the raw, uncentred features as the
  thesis does (§2.2); ``center="global_mean"`` measures them on ``h - mu_G`` instead;
* ``intra_c`` includes the i = j pairs (thesis §2.2), which makes it ``||s_c||^2`` with ``s_c`` the mean
  unit-normalised feature of class c (Lemma 2.4.4) and lets it be computed in O(N d);
* ``nc1 = Tr(Sigma_W pinv(Sigma_B)) / C`` with ``pinv`` truncated explicitly to rank ``C - 1``;
* with unequal class sizes ``loss`` and ``alpha`` are class-balanced averages; a bias is folded in
  (``h -> [h, 1]``, ``W -> [W, b]``) before ``alpha``, ``beta``, ``min_loss_m`` (thesis Theorem 2.3.1).

Numerics: float64 accumulation whatever the input dtype, two passes (class means, then centred statistics),
memory one chunk plus O(C d); see :mod:`ncengine.stats`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import numpy as np
import torch

from ncengine.errors import BoundViolation, InputError
from ncengine.jsonsafe import json_safe
from ncengine.stats import CenteredAccumulator, ClassMeanAccumulator, HeldOutAccumulator, range_basis
from ncengine.stats import _one_thread

_F64 = torch.float64
# A float64 chunk is capped at this many bytes whatever ``chunk_size`` says (shared between the worker
# threads), so that peak memory stays at a few such chunks (the float64 copy, the centred copy) even for wide
# features.
# Small enough to stay cache-friendly: on the 2-core bench machine 8 MiB chunks (2048 rows of d = 512) ran
# faster than 16, 32 or 64 MiB ones (bench/bench_measure.py).
_MAX_CHUNK_BYTES = 8 * 2**20
# Streams without num_classes grow their per-class state with the largest label seen; refuse absurd ids.
_MAX_CLASSES = 65536

__all__ = ["NCResult", "measure", "effective_depth"]


# --------------------------------------------------------------------------------------------- result


@dataclass
class NCResult:
    """Result of :func:`measure`: scalars, per-class arrays and (with weights) the bound block.

    ``values`` maps DESIGN.md key names to python scalars or numpy arrays; ``result[key]`` reads one.
    """

    values: dict[str, Any] = dc_field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def keys(self):
        return self.values.keys()

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-safe dict: python floats/ints/bools, lists for arrays, ``None`` where undefined (never NaN)."""
        return {k: json_safe(v) for k, v in self.values.items()}


# --------------------------------------------------------------------------------------------- input checks


def _labels_array(labels: Any, field: str, *, remap: bool) -> np.ndarray:
    """Validate labels and return them as a 1-D int64 numpy array (not yet mapped to 0..C-1)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    try:
        arr = np.asarray(labels)
    except (TypeError, ValueError) as exc:
        raise InputError(field, f"cannot be read as an array ({exc})", expected="integer class ids, shape (N,)") from exc
    if arr.dtype == object or arr.dtype.kind in "USVc":
        raise InputError(field, f"dtype {arr.dtype} is not allowed", expected="integer class ids, shape (N,)")
    if arr.ndim == 2 and arr.shape[1] >= 2 and arr.shape[0] > 0:
        as_f = arr.astype(np.float64, copy=False)
        if np.all((as_f == 0) | (as_f == 1)) and np.all(as_f.sum(axis=1) == 1):
            raise InputError(field, f"labels look one-hot, shape {arr.shape}; pass labels.argmax(axis=1)",
                             expected="integer class ids, shape (N,)")
    if arr.ndim != 1:
        raise InputError(field, f"has shape {arr.shape}", expected="a 1-D array of integer class ids, shape (N,)")
    if arr.dtype.kind == "b":
        raise InputError(field, "boolean labels", expected="integer class ids 0..C-1")
    if arr.dtype.kind == "f":
        raise InputError(field, f"dtype {arr.dtype} is not an integer type (cast with .astype(int) if the values "
                         "are whole numbers)", expected="integer class ids 0..C-1")
    if arr.dtype.kind not in "iu":
        raise InputError(field, f"dtype {arr.dtype}", expected="integer class ids 0..C-1")
    arr = np.array(arr, dtype=np.int64)  # an owned, writable copy (labels are O(N), never the memory hog)
    if not remap and arr.size and int(arr.min()) < 0:
        raise InputError(field, f"{int((arr < 0).sum())} negative label(s), smallest {int(arr.min())}",
                         expected="class ids 0..C-1 (or pass remap_labels=True to map the distinct ids to 0..K-1)")
    return arr


def _float_dtype_ok(dtype: Any, field: str) -> None:
    if isinstance(dtype, torch.dtype):
        if dtype.is_complex or dtype == torch.bool:
            raise InputError(field, f"dtype {dtype}", expected="float16/bfloat16/float32/float64")
        return
    dt = np.dtype(dtype)
    if dt == object or dt.kind in "USVcbOM m":
        raise InputError(field, f"dtype {dt} is not allowed", expected="float16/bfloat16/float32/float64")


def _tensor_f64(x: Any, field: str, device: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
    """A small array (weights, bias) as a finite float64 tensor of the expected shape."""
    if isinstance(x, torch.Tensor):
        _float_dtype_ok(x.dtype, field)
        t = x.detach().to(device=device, dtype=_F64)
    else:
        arr = np.asarray(x)
        _float_dtype_ok(arr.dtype, field)
        t = torch.from_numpy(np.array(arr, dtype=np.float64)).to(device)
    if tuple(t.shape) != shape:
        hint = ""
        if t.ndim == 2 and tuple(t.shape) == shape[::-1]:
            hint = " (transposed? pass the (C, d) matrix whose rows are the class weight vectors)"
        raise InputError(field, f"has shape {tuple(t.shape)}{hint}", expected=str(shape))
    if not bool(torch.isfinite(t).all()):
        raise InputError(field, f"{int((~torch.isfinite(t)).sum())} NaN/Inf entries", expected="finite values")
    return t


# --------------------------------------------------------------------------------------------- sources


def _to_f64_tensor(chunk: Any, device: torch.device, field: str, out: _ChunkBuffer | None = None) -> torch.Tensor:
    """A chunk as a float64 tensor on ``device``. With ``out`` the chunk is copied into ``out``'s reused buffer, so
    the result is always a private copy, valid only until the next call with the same buffer."""
    if isinstance(chunk, torch.Tensor):
        _float_dtype_ok(chunk.dtype, field)
        chunk = chunk.detach()
        if out is None or chunk.ndim != 2:
            return chunk.to(device=device, dtype=_F64)
        return out.get(chunk.shape, _F64, device).copy_(chunk)
    arr = np.asarray(chunk)
    _float_dtype_ok(arr.dtype, field)
    if out is None or arr.ndim != 2 or device.type != "cpu":
        return torch.from_numpy(np.array(arr, dtype=np.float64)).to(device)
    buf = out.get(arr.shape, _F64, device)
    np.copyto(buf.numpy(), arr, casting="unsafe")  # numpy's cast straight into the buffer (faster than torch's)
    return buf


class _ChunkBuffer:
    """One reusable chunk buffer per dtype (allocated once, grown if a larger chunk arrives)."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n, d = int(shape[0]), int(shape[1])
        b = self._bufs.get(dtype)
        if b is None or b.device != device or b.shape[1] != d or b.shape[0] < n:
            b = self._bufs[dtype] = torch.empty(max(n, 1), d, dtype=dtype, device=device)
        return b[:n]


def _release_pages(arr: np.ndarray, start_row: int, stop_row: int) -> None:
    """Drop the pages of rows [start_row, stop_row) of a top-level read-only ``np.memmap`` from this process's
    resident set (they stay in the OS page cache), so streaming a large ``.npy`` keeps RSS at one chunk."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or arr.base is not mm or not arr.flags.c_contiguous or not hasattr(mm, "madvise"):
        return
    row_bytes = arr.strides[0]
    data_start = int(arr.offset) % mmap.ALLOCATIONGRANULARITY  # numpy maps from the offset rounded down
    lo = data_start + start_row * row_bytes
    hi = data_start + stop_row * row_bytes
    lo -= lo % mmap.PAGESIZE
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, max(0, min(hi, len(mm)) - lo))
    except (OSError, ValueError, AttributeError):
        pass


class _ArraySource:
    """Features held as one (N, d) array (numpy, memmap, torch on any device), labels as one (N,) array."""

    def __init__(self, X: Any, labels: Any, *, field: str, labels_field: str, chunk_rows: int,
                 device: torch.device, remap: bool, ids: np.ndarray | None = None,
                 max_bytes: int = _MAX_CHUNK_BYTES) -> None:
        if not isinstance(X, (torch.Tensor, np.ndarray)):
            try:
                X = np.asarray(X)
            except (TypeError, ValueError) as exc:
                raise InputError(field, f"cannot be read as an array ({exc})", expected="shape (N, d)") from exc
        _float_dtype_ok(X.dtype, field)
        if X.ndim != 2:
            raise InputError(field, f"has shape {tuple(X.shape)}", expected="a 2-D array of shape (N, d)")
        y = _labels_array(labels, labels_field, remap=remap)
        N, d = int(X.shape[0]), int(X.shape[1])
        if y.shape[0] != N:
            hint = " (features transposed? they must be (N, d), one row per sample)" if int(X.shape[1]) == y.shape[0] \
                else ""
            raise InputError(labels_field, f"has {y.shape[0]} entries but {field} has {N} rows{hint}",
                             expected=f"{N} labels, one per row of {field}")
        if N == 0 or d == 0:
            raise InputError(field, f"is empty, shape {(N, d)}", expected="at least one row and one column")
        self.X, self.N, self.d, self.field = X, N, d, field
        self.device = device
        self.rows = max(1, min(chunk_rows, max_bytes // (8 * d)))
        self.raw_labels = y
        self.ids = ids
        self._y_dev: torch.Tensor | None = None

    def set_classes(self, ids: np.ndarray | None) -> np.ndarray:
        """Map labels to 0..C-1 (through the sorted distinct ``ids`` when remapping); returns the mapped labels."""
        y = self.raw_labels
        if ids is not None:
            pos = np.searchsorted(ids, y)
            pos = np.clip(pos, 0, len(ids) - 1)
            if not np.array_equal(ids[pos], y):
                bad = y[ids[pos] != y]
                raise InputError(self.field.replace("features", "labels"),
                                 f"label id(s) {bad[:10].tolist()} do not occur in the training labels",
                                 expected=f"ids among {ids[:20].tolist()}")
            y = pos
        self._y_dev = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(self.device)
        return y

    def raw_chunks(self) -> Iterator[tuple[Any, torch.Tensor, Callable[[], None]]]:
        """``(features view (n, d), labels (n,), release)``: the features as stored (no copy yet);
        ``release()`` drops a memory-mapped chunk's pages once it has been converted."""
        assert self._y_dev is not None
        mapped = isinstance(self.X, np.memmap)
        for a in range(0, self.N, self.rows):
            b = min(a + self.rows, self.N)
            release = functools.partial(_release_pages, self.X, a, b) if mapped else _noop
            yield self.X[a:b], self._y_dev[a:b], release

    def convert(self, raw: Any, buf: _ChunkBuffer) -> torch.Tensor:
        """A raw chunk as a private float64 copy in ``buf`` (valid until ``buf`` is reused)."""
        return _to_f64_tensor(raw, self.device, self.field, buf)

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(features (n, d), labels (n,))`` chunks: private float64 copies, each valid until the next one is
        drawn (one reused buffer)."""
        buf = _ChunkBuffer()
        for raw, y, release in self.raw_chunks():
            H = self.convert(raw, buf)
            release()
            yield H, y


def _noop() -> None:
    return None


class _RemapTable:
    """Streaming label remapping: slots in order of first appearance, sorted at the end."""

    def __init__(self) -> None:
        self.index: dict[int, int] = {}

    def slots(self, y: np.ndarray) -> np.ndarray:
        uniq, inv = np.unique(y, return_inverse=True)
        for u in uniq.tolist():
            if u not in self.index:
                self.index[u] = len(self.index)
        table = np.fromiter((self.index[u] for u in uniq.tolist()), dtype=np.int64, count=len(uniq))
        return table[inv.reshape(-1)]

    def sorted_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, order)``: the distinct ids sorted, and ``order[k]`` = the slot of ``ids[k]``."""
        ids = np.array(sorted(self.index), dtype=np.int64)
        order = np.array([self.index[i] for i in ids.tolist()], dtype=np.int64)
        return ids, order


class _StreamSource:
    """Features and labels from a zero-argument callable returning an iterator of (features, labels) chunks."""

    def __init__(self, factory: Callable[[], Iterable[tuple[Any, Any]]], *, field: str, labels_field: str,
                 chunk_rows: int, device: torch.device, remap: bool,
                 max_bytes: int = _MAX_CHUNK_BYTES) -> None:
        self.factory, self.field, self.labels_field = factory, field, labels_field
        self.chunk_rows, self.device, self.remap, self.max_bytes = chunk_rows, device, remap, max_bytes
        self.d: int | None = None
        self.N: int | None = None
        self.ids: np.ndarray | None = None
        self.remap_table = _RemapTable() if remap else None
        self.C: int | None = None

    def set_classes(self, ids: np.ndarray | None, num_classes: int) -> None:
        """Fix the class ids (sorted distinct ids when remapping) after pass 1; later chunks are mapped to 0..C-1."""
        self.ids = ids
        self.C = num_classes

    def _raw_chunks(self) -> Iterator[tuple[Any, np.ndarray]]:
        try:
            it = iter(self.factory())
        except TypeError as exc:
            raise InputError(self.field, f"the callable did not return an iterable ({exc})",
                             expected="a zero-argument callable returning an iterator of (features, labels)") from exc
        for item in it:
            try:
                Xc, yc = item
            except (TypeError, ValueError) as exc:
                raise InputError(self.field, "a chunk is not a (features, labels) pair",
                                 expected="an iterator of (features_chunk, labels_chunk)") from exc
            if not isinstance(Xc, (torch.Tensor, np.ndarray)):
                Xc = np.asarray(Xc)
            _float_dtype_ok(Xc.dtype, self.field)
            yv = _labels_array(yc, self.labels_field, remap=self.remap)
            if Xc.ndim != 2 or Xc.shape[0] != yv.shape[0]:
                raise InputError(self.field, f"a chunk has features of shape {tuple(Xc.shape)} and "
                                 f"{yv.shape[0]} labels", expected="(n, d) features with n labels per chunk")
            if self.d is None:
                self.d = int(Xc.shape[1])
            elif int(Xc.shape[1]) != self.d:
                raise InputError(self.field, f"a chunk has {Xc.shape[1]} columns, earlier chunks {self.d}",
                                 expected="the same d in every chunk")
            rows = max(1, min(self.chunk_rows, self.max_bytes // (8 * max(self.d, 1))))
            for a in range(0, int(Xc.shape[0]), rows):
                yield Xc[a:a + rows], yv[a:a + rows]

    def raw_chunks(self) -> Iterator[tuple[Any, torch.Tensor, Callable[[], None]]]:
        """Before ``set_classes`` (pass 1): class slots (remap: order of first appearance). After: 0..C-1.
        Features as in :meth:`_ArraySource.raw_chunks`."""
        first = self.C is None
        seen = 0
        for Xc, yv in self._raw_chunks():
            seen += int(yv.shape[0])
            if first:
                y = self.remap_table.slots(yv) if self.remap_table is not None else yv
            else:
                y = yv
                if self.ids is not None:
                    pos = np.clip(np.searchsorted(self.ids, yv), 0, len(self.ids) - 1)
                    if not np.array_equal(self.ids[pos], yv):
                        raise InputError(self.labels_field, f"label id(s) {yv[self.ids[pos] != yv][:10].tolist()} "
                                         "do not occur in the training labels",
                                         expected=f"ids among {self.ids[:20].tolist()}")
                    y = pos
                if y.size and int(y.max()) >= self.C:
                    raise InputError(self.labels_field, f"contain label {int(y.max())} but there are {self.C} classes",
                                     expected=f"labels 0..{self.C - 1}")
            yield Xc, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).to(self.device), _noop
        if first:
            self.N = seen
        elif self.N is not None and seen != self.N:
            raise InputError(self.field, f"the chunk iterator yielded {seen} rows on its second pass, {self.N} on "
                             "its first", expected="the callable to yield the same data every time it is called")

    convert = _ArraySource.convert
    chunks = _ArraySource.chunks


def _make_source(X: Any, labels: Any, *, field: str, labels_field: str, chunk_rows: int, device: torch.device,
                 remap: bool, max_bytes: int = _MAX_CHUNK_BYTES):
    if callable(X) and not isinstance(X, (torch.Tensor, np.ndarray)):
        if labels is not None:
            raise InputError(labels_field, "must be None when features is a callable (labels come with each chunk)",
                             expected="None")
        return _StreamSource(X, field=field, labels_field=labels_field, chunk_rows=chunk_rows, device=device,
                             remap=remap, max_bytes=max_bytes)
    if labels is None:
        raise InputError(labels_field, "is missing", expected="integer class ids, shape (N,)")
    return _ArraySource(X, labels, field=field, labels_field=labels_field, chunk_rows=chunk_rows, device=device,
                        remap=remap, max_bytes=max_bytes)


# --------------------------------------------------------------------------------------------- chunk workers


def _map_chunks(src: Any, work: Callable[[int, torch.Tensor, torch.Tensor, int], None], workers: int) -> int:
    """Call ``work(w, H, y, row0)`` for every chunk of ``src`` (``H`` a private float64 copy, ``row0`` the
    index of its first row); return the number of rows.

    On the CPU torch runs on one thread inside the loop: the chunk work is many memory-bound ops, and torch's
    intra-op threads synchronise after each of them, which on the busy 2-core bench machine cost far more than
    the second core gave (measured at N = 200,000: 2 intra-op threads 1.5-2x the wall time of 1). With
    ``workers > 1`` the chunks are processed data-parallel by that many threads instead (torch releases the
    GIL): chunk ``i`` always goes to worker ``i % workers``, so each worker's sums, and the result, do not
    depend on timing. The source is read by the calling thread; each worker converts its own chunks. The first
    error raised by a worker is re-raised here.
    """
    if workers <= 1:
        buf, row0 = _ChunkBuffer(), 0
        with _one_thread() if src.device.type == "cpu" else contextlib.nullcontext():
            for raw, y, release in src.raw_chunks():
                H = src.convert(raw, buf)
                release()
                work(0, H, y, row0)
                row0 += int(y.numel())
        return row0
    queues: list[queue.Queue] = [queue.Queue(maxsize=2) for _ in range(workers)]
    errors: list[BaseException] = []

    def run(w: int) -> None:
        buf = _ChunkBuffer()
        while (item := queues[w].get()) is not None:
            if errors:
                continue  # drain after a failure
            raw, y, release, start = item
            try:
                H = src.convert(raw, buf)
                release()
                work(w, H, y, start)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(exc)

    row0 = 0
    with _one_thread():
        threads = [threading.Thread(target=run, args=(w,), name=f"ncengine-chunks-{w}", daemon=True)
                   for w in range(workers)]
        for t in threads:
            t.start()
        try:
            for i, (raw, y, release) in enumerate(src.raw_chunks()):
                if errors:
                    break
                queues[i % workers].put((raw, y, release, row0))
                row0 += int(y.numel())
        finally:
            for q in queues:
                q.put(None)
            for t in threads:
                t.join()
    if errors:
        raise errors[0]
    return row0


# --------------------------------------------------------------------------------------------- metric helpers


def _offdiag(G: np.ndarray) -> np.ndarray:
    C = G.shape[0]
    return G[~np.eye(C, dtype=bool)]


def _cos_gram(X: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(X, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        U = X / n[:, None]
    return U @ U.T


def _nc2(X: np.ndarray) -> dict[str, float]:
    """Equinorm, equiangularity, max-angle and ETF distance of the rows of ``X`` (C, d) (Papyan 2020, Zhu 2021)."""
    C = X.shape[0]
    norms = np.linalg.norm(X, axis=1)
    off = _offdiag(_cos_gram(X))
    G = X @ X.T
    P = np.eye(C) - np.ones((C, C)) / C
    with np.errstate(invalid="ignore", divide="ignore"):
        etf = np.linalg.norm(G / np.linalg.norm(G) - P / np.linalg.norm(P))
        equinorm = norms.std() / norms.mean()
    return {
        "equinorm": float(equinorm),
        "equiangularity": float(off.std()),
        "max_angle": float(np.abs(off + 1.0 / (C - 1)).mean()),
        "etf_distance": float(etf),
    }


def _row_cos(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (A * B).sum(1) / (np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1))


def _nan_stat(fn, x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(fn(x)) if x.size else float("nan")


def _cosine_block(unit_sum: torch.Tensor, unit_count: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(intra (C,), inter (C, C))`` from per-class sums of unit vectors (thesis Lemma 2.4.4)."""
    S = unit_sum.cpu().numpy()
    cnt = unit_count.cpu().numpy().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = S / cnt[:, None]  # (C, d') mean unit feature; NaN row for a class whose rows all have norm 0
    inter = s @ s.T
    return np.diagonal(inter).copy(), inter


# --------------------------------------------------------------------------------------------- measure


def _check_classes(counts: np.ndarray, num_classes: int | None, ids: np.ndarray | None) -> int:
    """Validate per-class counts (C,) against ``num_classes``; return C. Errors name the empty classes."""
    max_label = len(counts) - 1
    if num_classes is not None:
        if ids is not None and num_classes != len(ids):
            raise InputError("num_classes", f"is {num_classes} but the labels hold {len(ids)} distinct ids",
                             expected=f"{len(ids)} (or leave it unset)")
        if max_label >= num_classes and counts[num_classes:].any():
            top = int(np.flatnonzero(counts)[-1])
            raise InputError("labels", f"contain label {top} but num_classes is {num_classes}",
                             expected=f"labels 0..{num_classes - 1}")
        counts = counts[:num_classes]
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        present = np.flatnonzero(counts)
        top = int(present[-1]) if present.size else -1
        if num_classes is not None and top + 1 < num_classes:
            msg = (f"num_classes is {num_classes} but the largest label is {top}: class(es) "
                   f"{empty[:20].tolist()} have no samples")
        else:
            msg = (f"class(es) {empty[:20].tolist()} have no samples; labels must be 0..C-1 with every class "
                   "present (pass remap_labels=True to map the distinct ids, e.g. 1..C, to 0..K-1)")
        raise InputError("labels", msg, expected="every class 0..C-1 to occur at least once")
    if len(counts) < 2:
        raise InputError("labels", f"only {len(counts)} class present", expected="at least 2 classes")
    return len(counts)



def measure(features: Any, labels: Any, weights: Any = None, bias: Any = None, *, num_classes: int | None = None,
            test_features: Any = None, test_labels: Any = None, center: str = "none",
            global_mean: str = "class_mean", chunk_size: int = 65536, device: str | torch.device | None = None,
            remap_labels: bool = False, threads: int = 1) -> NCResult:
    """Measure every Neural Collapse metric of DESIGN.md §1, exactly, in two streaming passes.

    Args:
        features: (N, d) float16/bfloat16/float32/float64 numpy array, ``np.memmap`` (e.g. a ``.npy`` opened
            with ``ncengine.io.load_array``), torch tensor (any device) or nested list; or a zero-argument
            callable returning an iterator of ``(features_chunk (n, d), labels_chunk (n,))`` that can be called
            twice (for inputs larger than memory; then ``labels`` must be None).
        labels: (N,) integer class ids in ``0..C-1`` (numpy, torch or list).
        weights: optional classifier ``W`` (C, d). Classifier keys appear only when it is given.
        bias: optional classifier bias ``b`` (C,); needs ``weights``.
        num_classes: C; default ``max(label) + 1``. Every class must occur.
        test_features, test_labels: optional held-out split (same kinds as ``features``/``labels``) for
            ``test_ncc_accuracy``, ``test_ncc_cos_accuracy`` and, with weights, ``test_classifier_accuracy`` and
            ``test_ncc_agreement``, with the training split's class means.
        center: ``"none"`` (thesis: cosines of raw features) or ``"global_mean"`` (cosines of ``h - mu_G``).
        global_mean: ``"class_mean"`` (mean of class means, Papyan 2020) or ``"sample"`` (sample mean).
        chunk_size: maximum rows per chunk (also capped so the float64 chunks of all threads together stay
            under 8 MiB).
        device: torch device for the float64 chunk arithmetic; default the features' device (CPU for numpy).
        remap_labels: map the K distinct label ids (any integers, e.g. ``1..C`` or sparse ids) to ``0..K-1`` in
            sorted order; ``label_ids`` in the result lists them.
        threads: CPU threads for the two passes over the chunks (ignored on other devices). The chunk loops
            run torch on one thread per worker: with ``threads > 1`` chunk ``i`` goes to worker
            ``i % threads`` (same result for the same ``threads``, to float64 rounding across different ones).
            The default 1 was the fastest on the busy 2-core bench machine; more threads are meant for idle
            cores.

    Returns:
        :class:`NCResult`; ``to_dict()`` gives the keys listed in ``docs/metrics.md``: ``num_classes``,
        ``num_samples``, ``dim``, ``class_counts`` (C,), ``zero_norm_count``, ``intra_cos`` (C,),
        ``intra_cos_min``, ``intra_cos_mean``, ``inter_cos`` (C, C; its diagonal is ``intra_cos``),
        ``inter_cos_max``, ``inter_cos_mean``, ``nc1``, ``nc1_trace_ratio``, ``nc1_rank``, ``cdnv_mean``,
        ``nc2_equinorm``, ``nc2_equiangularity``, ``nc2_max_angle``, ``nc2_etf_distance``, ``ncc_accuracy``,
        ``ncc_cos_accuracy``; with weights also ``nc2_w_*``, ``nc3_self_duality``, ``nc3_cos`` (C,),
        ``nc3_cos_mean``, ``nc3_cos_min``, ``nc3_cos_thesis`` (C,), ``nc3_cos_thesis_mean``,
        ``nc3_cos_thesis_min``, ``classifier_accuracy``, ``ncc_agreement``, ``loss``, ``alpha``, ``beta``,
        ``min_loss_m``, ``epsilon`` and ``bounds`` (Theorem 2.3.1 block from :mod:`ncengine.bounds`).

    Raises:
        InputError: bad input, naming the field: wrong ndim or axis order, non-integer, negative or one-hot
            labels, a class without samples (naming it), ``num_classes`` inconsistent with the labels, fewer than
            2 classes, NaN/Inf rows (counted), weights/bias of the wrong shape, bad option values.
        BoundViolation: the runtime self-check ``loss >= min_loss_m`` (Theorem 2.3.1) failed.

    Sources: thesis §2.2 and Lemma 2.4.4 (cosines), eq. 2.21 (``nc3_cos_thesis``), Theorem 2.3.1 (``alpha``,
    ``beta``, ``min_loss_m``); Papyan, Han & Donoho 2020 (NC1-NC4); Galanti et al. 2022 (CDNV); Zhu et al. 2021
    (ETF distance); Tirer et al. 2023 (trace ratio).
    """
    if center not in ("none", "global_mean"):
        raise InputError("center", f"got {center!r}", expected="'none' or 'global_mean'")
    if global_mean not in ("class_mean", "sample"):
        raise InputError("global_mean", f"got {global_mean!r}", expected="'class_mean' or 'sample'")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise InputError("chunk_size", f"got {chunk_size!r}", expected="a positive integer")
    if num_classes is not None and (not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool)):
        raise InputError("num_classes", f"got {num_classes!r}", expected="an integer >= 2")
    if bias is not None and weights is None:
        raise InputError("bias", "given without weights", expected="weights (C, d) together with bias (C,)")
    if (test_features is None) != (test_labels is None) and not callable(test_features):
        raise InputError("test_labels" if test_labels is None else "test_features",
                         "the held-out split needs both test_features and test_labels", expected="both or neither")
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) or not 1 <= threads <= 256:
        raise InputError("threads", f"got {threads!r}", expected="an integer from 1 to 256")
    if device is not None:
        dev = torch.device(device)
    elif isinstance(features, torch.Tensor):
        dev = features.device
    else:
        dev = torch.device("cpu")

    workers = int(threads) if dev.type == "cpu" else 1
    src = _make_source(features, labels, field="features", labels_field="labels", chunk_rows=int(chunk_size),
                       device=dev, remap=remap_labels, max_bytes=max(_MAX_CHUNK_BYTES // workers, 1))

    # ---- class ids -> 0..C-1 (array source: known up front)
    ids: np.ndarray | None = None
    if isinstance(src, _ArraySource):  # labels are in memory: check them before reading any feature
        if remap_labels:
            ids = np.unique(src.raw_labels)
        y0 = src.set_classes(ids)
        top = int(y0.max())
        if num_classes is None and top + 1 > src.N:
            raise InputError("labels", f"the largest label is {top} but there are only {src.N} rows, so some classes "
                             "have no samples", expected="labels 0..C-1 with every class present (or pass "
                             "remap_labels=True to map the distinct ids to 0..K-1)")
        if num_classes is not None and top >= num_classes:
            _check_classes(np.ones(top + 1, dtype=np.int64), num_classes, ids)
        _check_classes(np.bincount(y0, minlength=num_classes or 0), num_classes, ids)

    # ---- pass 1: class means, squared norms, NaN/Inf rows (one accumulator per worker, merged in order)
    accs1: list[ClassMeanAccumulator | None] = [None] * workers
    bad = [[0, -1] for _ in range(workers)]  # per worker: NaN/Inf rows, first such row

    def pass1(w: int, H: torch.Tensor, y: torch.Tensor, row0: int) -> None:
        if accs1[w] is None:
            accs1[w] = ClassMeanAccumulator(int(H.shape[1]), num_classes or 0, device=dev,
                                            fold=bias is not None)
        norms = torch.linalg.vector_norm(H, dim=1)  # (n,)
        if not bool(torch.isfinite(norms).all()):
            finite = torch.isfinite(H).all(dim=1)
            nb = int((~finite).sum())
            if not nb:
                raise InputError("features", "values too large: a row's norm overflows float64",
                                 expected="finite values of moderate size")
            if bad[w][1] < 0:
                bad[w][1] = row0 + int((~finite).nonzero()[0, 0])
            bad[w][0] += nb
        if not bad[w][0]:
            if y.numel() and int(y.max()) >= max(num_classes or 0, _MAX_CLASSES):
                raise InputError("labels", f"contain label {int(y.max())}; more than {_MAX_CLASSES} classes",
                                 expected="class ids 0..C-1 (pass num_classes, or remap_labels=True for sparse ids)")
            accs1[w].update(H, y, norms, overwrite=True)  # H is this worker's private copy

    row0 = _map_chunks(src, pass1, workers)
    parts = [a for a in accs1 if a is not None]
    if not parts or row0 == 0:
        raise InputError("features", "no rows", expected="at least one (features, labels) row per class")
    bad_rows = sum(nb for nb, _ in bad)
    if bad_rows:
        first_bad = min(f for nb, f in bad if nb)
        raise InputError("features", f"{bad_rows} row(s) contain NaN or Inf (first at row {first_bad})",
                         expected="finite values")
    acc1 = parts[0]
    for other in parts[1:]:
        acc1.merge(other)
    if isinstance(src, _StreamSource) and src.remap_table is not None:
        ids, order = src.remap_table.sorted_ids()
        acc1.permute(torch.from_numpy(order).to(dev))

    counts_np = acc1.counts.cpu().numpy()
    C = _check_classes(counts_np, num_classes, ids)
    if isinstance(src, _StreamSource):
        src.set_classes(ids, C)
    means = acc1.compute()
    mu = means.mu  # (C, d)
    d = int(mu.shape[1])
    N = int(counts_np.sum())
    n_c = means.counts.to(_F64)  # (C,)
    mu_G = mu.mean(dim=0) if global_mean == "class_mean" else acc1.sum_h.sum(dim=0) / N  # (d,)
    M = mu - mu_G  # (C, d)
    U, lam = range_basis(M, min(C - 1, d))  # (d, r), (r,)

    W = _tensor_f64(weights, "weights", dev, (C, d)) if weights is not None else None
    b = _tensor_f64(bias, "bias", dev, (C,)) if bias is not None else None

    # ---- pass 2: centred statistics, cosines, NCC, classifier
    acc2 = CenteredAccumulator(means, mu_G, U, W, b, center_cos=(center == "global_mean"))
    accs2 = [acc2] + [acc2.spawn() for _ in range(workers - 1)]
    _map_chunks(src, lambda w, H, y, row0: accs2[w].update(H, y), workers)
    for other in accs2[1:]:
        acc2.merge(other)

    r = dict()
    r["num_classes"] = C
    r["num_samples"] = N
    r["dim"] = d
    r["class_counts"] = counts_np.astype(np.int64)
    if ids is not None:
        r["label_ids"] = ids
    cos_acc = acc2 if center == "global_mean" else acc1
    r["zero_norm_count"] = int(cos_acc.zero_norm)
    intra, inter = _cosine_block(cos_acc.unit_sum, cos_acc.unit_count)
    off = _offdiag(inter)
    r["intra_cos"] = intra
    r["intra_cos_min"] = _nan_stat(np.min, intra)
    r["intra_cos_mean"] = _nan_stat(np.mean, intra)
    r["inter_cos"] = inter
    r["inter_cos_max"] = _nan_stat(np.max, off)
    r["inter_cos_mean"] = _nan_stat(np.mean, off)

    ss = acc2.ss_within  # (C,)
    tr_sw = float(ss.sum()) / N
    tr_sb = float((M * M).sum()) / C
    r["nc1"] = float((acc2.proj_sq / lam).sum()) / N / C if lam.numel() else float("nan")
    r["nc1_trace_ratio"] = tr_sw / tr_sb if tr_sb > 0 else float("nan")
    r["nc1_rank"] = int(lam.numel())

    var = (ss / n_c).cpu().numpy()  # (C,)
    mu_np = mu.cpu().numpy()
    M_np = M.cpu().numpy()
    sq = (mu_np * mu_np).sum(1)
    D2 = np.maximum(sq[:, None] + sq[None, :] - 2 * mu_np @ mu_np.T, 0.0)  # (C, C) ||mu_c - mu_c'||^2
    iu = np.triu_indices(C, 1)
    diff = mu_np[iu[0]] - mu_np[iu[1]]  # exact pair distances for the pairs (no cancellation)
    D2[iu] = (diff * diff).sum(1) if C <= 2048 else D2[iu]
    with np.errstate(invalid="ignore", divide="ignore"):
        r["cdnv_mean"] = float(np.mean((var[iu[0]] + var[iu[1]]) / (2 * D2[iu])))

    for k, v in _nc2(M_np).items():
        r[f"nc2_{k}"] = v
    r["ncc_accuracy"] = acc2.ncc_correct / N
    r["ncc_cos_accuracy"] = acc2.ncc_cos_correct / N

    if W is not None:
        W_np = W.cpu().numpy()
        b_np = b.cpu().numpy() if b is not None else None
        for k, v in _nc2(W_np).items():
            r[f"nc2_w_{k}"] = v
        with np.errstate(invalid="ignore", divide="ignore"):
            r["nc3_self_duality"] = float(np.sum((W_np / np.linalg.norm(W_np) - M_np / np.linalg.norm(M_np)) ** 2))
        nc3 = _row_cos(W_np, M_np)
        r["nc3_cos"] = nc3
        r["nc3_cos_mean"] = _nan_stat(np.mean, nc3)
        r["nc3_cos_min"] = _nan_stat(np.min, nc3)
        nc3t = _row_cos(W_np - W_np.mean(0), mu_np)
        r["nc3_cos_thesis"] = nc3t
        r["nc3_cos_thesis_mean"] = _nan_stat(np.mean, nc3t)
        r["nc3_cos_thesis_min"] = _nan_stat(np.min, nc3t)
        r["classifier_accuracy"] = int(acc2.clf_correct.sum()) / N
        r["ncc_agreement"] = acc2.agree / N

        loss = float((acc2.loss_sum / n_c).mean())  # class-balanced
        alpha_sq = float(means.mean_sq_norm.mean())  # class-balanced mean ||h||^2
        beta_sq = float((W * W).sum()) / C
        if b is not None:  # fold the bias: h -> [h, 1], W -> [W, b] (thesis Theorem 2.3.1)
            alpha_sq += 1.0
            beta_sq += float((b * b).sum()) / C
        alpha, beta = math.sqrt(alpha_sq), math.sqrt(beta_sq)
        from ncengine import bounds as _bounds  # lazy: bounds is optional for the measurement itself

        m = _bounds.min_loss_m(alpha, beta, C)
        r["loss"], r["alpha"], r["beta"], r["min_loss_m"], r["epsilon"] = loss, alpha, beta, m, loss - m
        if loss - m < -1e-9 * max(1.0, abs(m)):
            raise BoundViolation(f"self-check failed: class-balanced loss {loss!r} < min_loss_m {m!r} "
                                 f"(alpha={alpha!r}, beta={beta!r}, C={C}); Theorem 2.3.1 says loss >= m")
        # The theorem is about the unbiased (folded) problem on raw features: feed it those cosines.
        if b is not None:
            b_intra, b_inter = _cosine_block(acc1.fold_sum, acc1.counts)
            Wf = np.concatenate([W_np, b_np[:, None]], axis=1)
            muf = np.concatenate([mu_np, np.ones((C, 1))], axis=1)
            b_nc3 = _row_cos(Wf - Wf.mean(0), muf)
        else:
            b_intra, b_inter = _cosine_block(acc1.unit_sum, acc1.unit_count)
            b_nc3 = nc3t
        r["bounds"] = _bounds.theorem_2_3_1(alpha, beta, C, loss).check(
            intra_cos=b_intra, inter_cos=b_inter, nc3_cos_thesis=b_nc3)

    if test_features is not None:
        tsrc = _make_source(test_features, test_labels, field="test_features", labels_field="test_labels",
                            chunk_rows=int(chunk_size), device=dev, remap=remap_labels)
        if tsrc.d is not None and tsrc.d != d:
            raise InputError("test_features", f"has {tsrc.d} columns, features {d}", expected=f"(M, {d})")
        if isinstance(tsrc, _ArraySource):
            ty = tsrc.set_classes(ids)
            if ty.size and (int(ty.min()) < 0 or int(ty.max()) >= C):
                raise InputError("test_labels", f"hold ids outside 0..{C - 1}", expected=f"labels 0..{C - 1}")
        else:
            tsrc.set_classes(ids, C)  # its chunks map straight to the training classes
        acc3 = HeldOutAccumulator(mu, mu_G, W, b, center_cos=(center == "global_mean"))
        for H, y in tsrc.chunks():
            if int(H.shape[1]) != d:
                raise InputError("test_features", f"has {H.shape[1]} columns, features {d}", expected=f"(M, {d})")
            if not bool(torch.isfinite(H).all()):
                raise InputError("test_features", "contain NaN or Inf", expected="finite values")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
                raise InputError("test_labels", f"hold ids outside 0..{C - 1}", expected=f"labels 0..{C - 1}")
            acc3.update(H, y)
        Nt = max(acc3.num_samples, 1)
        r["test_num_samples"] = acc3.num_samples
        r["test_ncc_accuracy"] = acc3.ncc_correct / Nt
        r["test_ncc_cos_accuracy"] = acc3.ncc_cos_correct / Nt
        if W is not None:
            r["test_classifier_accuracy"] = acc3.clf_correct / Nt
            r["test_ncc_agreement"] = acc3.agree / Nt
    return NCResult(r)


# --------------------------------------------------------------------------------------------- effective depth


def effective_depth(ncc_errors_per_layer: Sequence[float], eps: float) -> int | None:
    """Effective depth: the smallest layer whose nearest-class-mean error is at most ``eps``.

    Args:
        ncc_errors_per_layer: NCC error (``1 - ncc_accuracy``, in [0, 1]) of layers 1..L in order (entry 0 is
            layer 1, the output of the first hidden layer).
        eps: threshold in [0, 1].

    Returns:
        The 1-based layer number ``l`` of the first entry ``<= eps``, or ``None`` if no layer reaches it.

    Raises:
        InputError: ``eps`` outside [0, 1] or an error value that is not a finite number in [0, 1].

    Source: thesis Definition 3.2.2; Galanti, Galanti & Ben-Shaul (2022), "On the implicit bias towards minimal
    depth of deep neural networks".
    """
    if not (isinstance(eps, (int, float, np.floating)) and 0.0 <= float(eps) <= 1.0):
        raise InputError("eps", f"got {eps!r}", expected="a number in [0, 1]")
    errs = np.asarray(list(ncc_errors_per_layer), dtype=np.float64)
    if errs.ndim != 1 or not np.all(np.isfinite(errs)) or np.any((errs < 0) | (errs > 1)):
        raise InputError("ncc_errors_per_layer", f"got {errs.tolist()!r}", expected="a list of numbers in [0, 1]")
    hits = np.flatnonzero(errs <= float(eps))
    return int(hits[0]) + 1 if hits.size else None

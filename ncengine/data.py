"""Datasets of the training experiments (thesis Ch. 3), seeded and deterministic, returned as CPU tensors.

- ``teacher``: ``x ~ N(0, I_{input_dim})`` labelled by the argmax of a randomly initialised MLP of the thesis's
  architecture (Def. 3.2.1, ``teacher_depth`` linear layers, ReLU + non-affine batch norm with the statistics
  of the drawn pool), made class-balanced by rejection (the theory assumes balanced classes).
- ``conic``: a conic-hull dataset (thesis §3.1): ``x ~ N(0, I)`` labelled ``argmax_c <u_c, x>`` with random unit
  directions ``u_c``; class c is the convex cone ``{x : <u_c - u_c', x> >= 0 for all c'}`` with its vertex at
  the origin. Class-balanced by rejection.
- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 images, 10 classes, no download),
  each feature standardised to zero mean and unit variance (constant pixels stay 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ncengine.config import (
    DEFAULT_SYNTHETIC_CLASSES,
    DEFAULT_SYNTHETIC_INPUT_DIM,
    DEFAULT_SYNTHETIC_SAMPLES,
    DataConfig,
)
from ncengine.errors import InputError

#: rejection sampling gives up after drawing this many times the requested sample count.
MAX_REJECTION_FACTOR = 200


@dataclass(frozen=True)
class Dataset:
    """A labelled training set.

    Attributes:
        X: inputs, shape (N, input_dim), float64, CPU.
        y: labels, shape (N,), int64 in ``0..num_classes-1``.
        num_classes: C.
    """

    X: torch.Tensor
    y: torch.Tensor
    num_classes: int

    @property
    def input_dim(self) -> int:
        """Input dimension (columns of ``X``)."""
        return int(self.X.shape[1])

    def __len__(self) -> int:
        return int(self.X.shape[0])


def _rng(cfg: DataConfig, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, stream]))


def _balanced_by_rejection(draw, label, n_per_class: int, C: int, field_name: str, rng) -> Dataset:  # noqa: ANN001
    """Draw chunks ``x = draw(rng, k)``, label them, keep the first ``n_per_class`` of each class."""
    kept: list[list[np.ndarray]] = [[] for _ in range(C)]
    counts = np.zeros(C, dtype=np.int64)
    drawn, limit = 0, MAX_REJECTION_FACTOR * n_per_class * C
    chunk = max(1024, 2 * n_per_class * C)
    while counts.min() < n_per_class:
        if drawn >= limit:
            raise InputError(
                field_name,
                f"could not draw {n_per_class} samples of every class after {drawn} draws "
                f"(class counts {counts.tolist()})",
                expected="a labelling function whose classes are not vanishingly rare",
            )
        x = draw(rng, chunk)  # (k, d)
        lab = label(x)  # (k,)
        drawn += chunk
        for c in range(C):
            need = n_per_class - counts[c]
            if need > 0:
                xc = x[lab == c][:need]
                kept[c].append(xc)
                counts[c] += len(xc)
    X = np.concatenate([np.concatenate(k, axis=0) for k in kept], axis=0)
    y = np.repeat(np.arange(C), n_per_class)
    order = rng.permutation(len(y))  # interleave classes so that a prefix is not one class
    return Dataset(torch.from_numpy(X[order]), torch.from_numpy(y[order]).long(), C)


def _teacher(cfg: DataConfig, N: int, C: int, d: int) -> Dataset:
    rng = _rng(cfg, 1)
    widths = [d] + [cfg.teacher_width] * (cfg.teacher_depth - 1) + [C]
    layers = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        k = 1.0 / np.sqrt(fan_in)  # torch.nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        layers.append((rng.uniform(-k, k, (fan_out, fan_in)), rng.uniform(-k, k, fan_out)))

    # Batch-norm statistics of the teacher are fixed from one pilot pool, so the labelling is a fixed function.
    pilot = rng.standard_normal((max(4096, 4 * N), d))
    stats: list[tuple[np.ndarray, np.ndarray]] = []
    h = pilot
    for W, b in layers[:-1]:
        a = np.maximum(h @ W.T + b, 0.0)
        mu, sd = a.mean(0), np.sqrt(a.var(0) + 1e-5)
        stats.append((mu, sd))
        h = (a - mu) / sd
    W_last, b_last = layers[-1]
    # centre the logits on the pilot pool so that no class is vanishingly rare (keeps rejection cheap)
    b_last = b_last - (h @ W_last.T + b_last).mean(0)

    def label(x: np.ndarray) -> np.ndarray:
        h = x
        for (W, b), (mu, sd) in zip(layers[:-1], stats):
            h = (np.maximum(h @ W.T + b, 0.0) - mu) / sd
        return np.argmax(h @ W_last.T + b_last, axis=1)

    return _balanced_by_rejection(
        lambda r, k: r.standard_normal((k, d)), label, N // C, C, "data.teacher_depth", rng
    )


def _conic(cfg: DataConfig, N: int, C: int, d: int) -> Dataset:
    rng = _rng(cfg, 2)
    U = rng.standard_normal((C, d))
    U /= np.linalg.norm(U, axis=1, keepdims=True)  # (C, d) unit directions

    def label(x: np.ndarray) -> np.ndarray:
        return np.argmax(x @ U.T, axis=1)

    return _balanced_by_rejection(lambda r, k: r.standard_normal((k, d)), label, N // C, C, "data.input_dim", rng)


def _digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float64)
    sd = X.std(0)
    X = (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)
    if cfg.n is not None and cfg.n < len(y):
        idx = np.sort(_rng(cfg, 3).permutation(len(y))[: cfg.n])
        X, y = X[idx], y[idx]
    return Dataset(torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(y).long(), 10)


def load(cfg: DataConfig) -> Dataset:
    """Build the dataset a :class:`~ncengine.config.DataConfig` describes.

    Synthetic sets hold ``(n // num_classes) * num_classes`` samples, equally many per class.

    Args:
        cfg: the data section of a run config.

    Returns:
        A :class:`Dataset` with float64 inputs (N, input_dim) and int64 labels (N,), on CPU.

    Raises:
        InputError: ``n`` is smaller than the number of classes, or a class cannot be sampled.
    """
    if cfg.name == "digits":
        return _digits(cfg)
    N = cfg.n if cfg.n is not None else DEFAULT_SYNTHETIC_SAMPLES
    C = cfg.num_classes if cfg.num_classes is not None else DEFAULT_SYNTHETIC_CLASSES
    d = cfg.input_dim if cfg.input_dim is not None else DEFAULT_SYNTHETIC_INPUT_DIM
    if N < 2 * C:
        raise InputError("data.n", f"n={N} gives fewer than 2 samples per class", expected=f">= {2 * C}")
    return _teacher(cfg, N, C, d) if cfg.name == "teacher" else _conic(cfg, N, C, d)

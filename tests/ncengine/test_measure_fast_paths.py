"""Code paths of the fast measurement core that the reference tests in test_metrics.py do not reach.

* ``measure(..., threads=k)``: chunks processed data-parallel by k worker threads, merged in a fixed order;
* ``CenteredAccumulator`` given a basis ``U`` that is not a column subset of its own SVD basis (a rotated basis of
  the same range, and a basis that leaves the range), checked against the explicit projections;
* errors raised inside a worker thread reach the caller.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncengine.errors import InputError
from ncengine.metrics import measure
from ncengine.stats import CenteredAccumulator, ClassMeanAccumulator, range_basis


def _data(N=150, d=9, C=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(C), rng.integers(0, C, N - C)])
    H = rng.normal(size=(N, d)) + 2.5 * rng.normal(size=(C, d))[y] + 0.3
    return H, y, rng.normal(size=(C, d)), rng.normal(size=C)


def _close(a, b, key):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=1e-12, atol=1e-14,
                               err_msg=key)


@pytest.mark.parametrize("center", ["none", "global_mean"])
def test_threaded_chunks_equal_sequential(center):
    H, y, W, b = _data(seed=7)
    one = measure(H, y, W, b, chunk_size=13, center=center).to_dict()
    for threads in (2, 3):
        many = measure(H, y, W, b, chunk_size=13, center=center, threads=threads).to_dict()
        assert many.keys() == one.keys()
        for k, v in one.items():
            if k != "bounds":
                _close(many[k], v, k)


def test_threaded_chunks_report_bad_rows_and_bad_threads():
    H, y, W, _ = _data(seed=2)
    H[40, 3] = np.nan
    H[97, 0] = np.inf
    with pytest.raises(InputError, match=r"2 row\(s\) contain NaN or Inf \(first at row 40\)"):
        measure(H, y, W, chunk_size=10, threads=2)
    with pytest.raises(InputError) as err:
        measure(H, y, threads=0)
    assert err.value.field == "threads"


def _explicit(H, y, mu, U, W):
    D = H - mu[y]
    proj_sq = ((D @ U) ** 2).sum(0)
    dist = ((H[:, None, :] - mu[None, :, :]) ** 2).sum(-1)
    logits = H @ W.T
    ce = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1) - logits[np.arange(len(y)), y]
    return proj_sq, int((dist.argmin(1) == y).sum()), np.bincount(y, weights=ce), int((logits.argmax(1) == y).sum())


@pytest.mark.parametrize("kind", ["rotated", "outside_range"])
def test_projection_basis_not_a_subset_of_the_svd_basis(kind):
    H, y, W, _ = _data(N=120, d=8, C=4, seed=11)
    Ht, yt = torch.from_numpy(H), torch.from_numpy(y)
    acc1 = ClassMeanAccumulator(8)
    acc1.update(Ht, yt)
    means = acc1.compute()
    mu_G = means.mu.mean(0)
    U, _ = range_basis(means.mu - mu_G, 3)  # (8, 3)
    rng = np.random.default_rng(0)
    if kind == "rotated":  # same range, another orthonormal basis: projected through V
        Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        U = U @ torch.from_numpy(Q)
    else:  # a direction outside the range of the means: appended to the product
        U = torch.from_numpy(np.linalg.qr(rng.normal(size=(8, 3)))[0])
    acc = CenteredAccumulator(means, mu_G, U, torch.from_numpy(W))
    assert (acc._proj_idx is None) and ((acc._proj_mat is not None) == (kind == "rotated"))
    acc.update(Ht[:50], yt[:50])
    acc.update(Ht[50:], yt[50:])
    proj_sq, ncc, loss_sum, clf = _explicit(H, y, means.mu.numpy(), U.numpy(), W)
    np.testing.assert_allclose(acc.proj_sq.numpy(), proj_sq, rtol=1e-11)
    np.testing.assert_allclose(acc.loss_sum.numpy(), loss_sum, rtol=1e-11)
    assert acc.ncc_correct == ncc and int(acc.clf_correct.sum()) == clf

"""Tests for ncengine.stats: the float64 accumulators (chunked == whole == merged) and the range basis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ncengine.errors import InputError
from ncengine.stats import CenteredAccumulator, ClassMeanAccumulator, range_basis


def _data(N=80, d=5, C=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.arange(C), rng.integers(0, C, N - C)])
    H = rng.normal(size=(N, d)) + 3 * rng.normal(size=(C, d))[y]
    return torch.from_numpy(H), torch.from_numpy(y)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 79), max_size=6), seed=st.integers(0, 1000))
def test_pass1_chunked_and_merged_equal_whole(cuts, seed):
    H, y = _data(seed=seed)
    whole = ClassMeanAccumulator(5)
    whole.update(H, y)
    bounds = [0, *sorted(set(cuts)), 80]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc = ClassMeanAccumulator(5)
        acc.update(H[a:b], y[a:b])
        parts.append(acc)
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    want_mu = np.stack([H.numpy()[y.numpy() == c].mean(0) for c in range(4)])
    for acc in (whole, merged):
        m = acc.compute()
        np.testing.assert_allclose(m.mu.numpy(), want_mu, rtol=1e-12, atol=1e-12)
        assert m.counts.tolist() == np.bincount(y.numpy(), minlength=4).tolist()
        want_sq = [np.mean(np.sum(H.numpy()[y.numpy() == c] ** 2, 1)) for c in range(4)]
        np.testing.assert_allclose(m.mean_sq_norm.numpy(), want_sq, rtol=1e-12)


def test_pass1_state_dict_roundtrip_and_empty_class():
    H, y = _data()
    acc = ClassMeanAccumulator(5, num_classes=6)  # classes 4 and 5 never occur
    acc.update(H, y)
    other = ClassMeanAccumulator(5)
    other.load_state_dict(acc.state_dict())
    assert torch.equal(other.sum_h, acc.sum_h)
    with pytest.raises(InputError, match=r"\[4, 5\]"):
        acc.compute()


def test_pass2_merge_equals_whole_and_refuses_other_means():
    H, y = _data(seed=3)
    acc1 = ClassMeanAccumulator(5)
    acc1.update(H, y)
    means = acc1.compute()
    mu_G = means.mu.mean(0)
    U, _ = range_basis(means.mu - mu_G, 3)
    whole = CenteredAccumulator(means, mu_G, U)
    whole.update(H, y)
    a, b = CenteredAccumulator(means, mu_G, U), CenteredAccumulator(means, mu_G, U)
    a.update(H[:33], y[:33])
    b.update(H[33:], y[33:])
    a.merge(b)
    np.testing.assert_allclose(a.ss_within.numpy(), whole.ss_within.numpy(), rtol=1e-12)
    np.testing.assert_allclose(a.proj_sq.numpy(), whole.proj_sq.numpy(), rtol=1e-12)
    assert a.ncc_correct == whole.ncc_correct and a.num_samples == 80
    # within-class scatter against the explicit definition
    Hn, yn, mu = H.numpy(), y.numpy(), means.mu.numpy()
    want = [np.sum((Hn[yn == c] - mu[c]) ** 2) for c in range(4)]
    np.testing.assert_allclose(whole.ss_within.numpy(), want, rtol=1e-12)
    acc_other = ClassMeanAccumulator(5)
    acc_other.update(H[:40] + 1.0, y[:40])
    other_means = acc_other.compute()
    with pytest.raises(ValueError, match="different class means"):
        a.merge(CenteredAccumulator(other_means, mu_G, U))


def test_range_basis_matches_eigh_of_sigma_b():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(6, 9))
    M -= M.mean(0)  # rank 5 = C - 1
    U, lam = range_basis(torch.from_numpy(M), 5)
    SB = M.T @ M / 6
    ev = np.sort(np.linalg.eigvalsh(SB))[::-1][:5]
    np.testing.assert_allclose(lam.numpy(), ev, rtol=1e-12)
    np.testing.assert_allclose(U.numpy().T @ U.numpy(), np.eye(5), atol=1e-12)
    np.testing.assert_allclose(SB @ U.numpy(), U.numpy() * lam.numpy(), atol=1e-12)
    # collinear means span one direction: the numerically absent ones are dropped
    M1 = np.outer([1.0, -2.0, 1.0], rng.normal(size=4))
    U1, lam1 = range_basis(torch.from_numpy(M1), 2)
    assert U1.shape == (4, 1) and lam1.shape == (1,)

"""Datasets: seeded, balanced, and what their definitions say (conic classes are cones; digits standardised)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncengine.config import DataConfig
from ncengine.data import load
from ncengine.errors import InputError


@pytest.mark.parametrize("name", ["teacher", "conic"])
def test_synthetic_balanced_seeded(name):
    cfg = DataConfig(name=name, n=403, num_classes=5, input_dim=6, teacher_width=32, seed=7)
    ds = load(cfg)
    assert ds.X.shape == (400, 6) and ds.X.dtype == torch.float64  # 403 // 5 = 80 per class
    assert ds.y.dtype == torch.int64 and ds.num_classes == 5
    assert torch.bincount(ds.y, minlength=5).tolist() == [80] * 5
    again = load(cfg)
    assert torch.equal(ds.X, again.X) and torch.equal(ds.y, again.y)
    other = load(cfg.model_copy(update={"seed": 8}))
    assert not torch.equal(ds.X, other.X)


def test_defaults_are_the_issues():
    ds = load(DataConfig(name="conic"))
    assert ds.X.shape == (10_000, 32) and ds.num_classes == 10


def test_conic_classes_are_cones_through_origin():
    """Each conic class is a convex cone with vertex at 0, so the classes are separable by a linear map
    WITHOUT bias, and scaling an input by a > 0 keeps it on the correct side."""
    from sklearn.linear_model import LogisticRegression

    ds = load(DataConfig(name="conic", n=400, num_classes=4, input_dim=5, seed=1))
    X, y = ds.X.numpy(), ds.y.numpy()
    clf = LogisticRegression(C=1e6, fit_intercept=False, max_iter=20_000).fit(X, y)
    assert (clf.predict(X) == y).mean() == 1.0
    assert (clf.predict(3.7 * X) == y).mean() == 1.0


def test_teacher_labels_are_not_trivially_linear():
    """The teacher is a nonlinear MLP; labels still depend on x (a linear probe beats chance by far)."""
    from sklearn.linear_model import LogisticRegression

    ds = load(DataConfig(name="teacher", n=1000, num_classes=4, input_dim=6, teacher_width=32))
    acc = LogisticRegression(max_iter=5000).fit(ds.X.numpy(), ds.y.numpy()).score(ds.X.numpy(), ds.y.numpy())
    assert acc > 0.4  # chance is 0.25


def test_digits_standardised():
    from sklearn.datasets import load_digits

    X0, y0 = load_digits(return_X_y=True)
    ds = load(DataConfig(name="digits"))
    assert ds.X.shape == (1797, 64) and ds.num_classes == 10
    assert np.array_equal(ds.y.numpy(), y0)
    X = ds.X.numpy()
    np.testing.assert_allclose(X.mean(0), 0.0, atol=1e-12)
    sd = X.std(0)
    const = X0.std(0) == 0
    np.testing.assert_allclose(sd[~const], 1.0, rtol=1e-12)
    assert np.all(X[:, const] == 0)
    # same ordering of pixel values within each column (an affine increasing map of the raw data)
    j = 20
    np.testing.assert_allclose(X[:, j], (X0[:, j] - X0[:, j].mean()) / X0[:, j].std(), rtol=1e-12)


def test_digits_subset():
    ds = load(DataConfig(name="digits", n=300, seed=2))
    assert ds.X.shape == (300, 64)


def test_too_few_samples_named():
    with pytest.raises(InputError) as e:
        load(DataConfig(name="teacher", n=10, num_classes=10))
    assert e.value.field == "data.n"

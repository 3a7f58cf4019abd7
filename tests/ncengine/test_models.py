"""MLPEnsemble: each member computes what torch.nn.Linear/ReLU/BatchNorm1d compute with its parameters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ncengine.models import MLPEnsemble, build_mlp

BNS = ["affine", "non_affine", "none", "affine"]  # mixed order: torch.where path
BNS_PREFIX = ["affine", "non_affine", "affine", "none"]  # batch-norm members first: concatenation path


def _ens(dtype=torch.float64, bns=BNS, seeds=(5, 6, 7, 8)):
    return MLPEnsemble(7, 12, 4, 3, bns, list(seeds), dtype=dtype)


def _perturb(ens):
    """Move the affine members' gammas/betas off 1/0 so the affine path is exercised."""
    g = torch.Generator().manual_seed(0)
    mask = ens.affine_mask.to(torch.float64).unsqueeze(1)
    with torch.no_grad():
        for p in list(ens.gammas) + list(ens.betas):
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) * mask)


def test_init_is_nn_linear_default_and_seeded_per_member():
    ens = _ens()
    for W in ens.weights:  # stored (M, in, out)
        k = 1 / math.sqrt(W.shape[1])
        assert W.abs().max() <= k and W.abs().max() > 0.8 * k  # U(-k, k)
    # a member's init depends on its own seed only, not on its position or company
    solo = MLPEnsemble(7, 12, 4, 3, ["none"], [7], dtype=torch.float64)
    for l in range(4):
        assert torch.equal(ens.weights[l][2], solo.weights[l][0])
        assert torch.equal(ens.biases[l][2], solo.biases[l][0])


@pytest.mark.parametrize("bns", [BNS, BNS_PREFIX])
@pytest.mark.parametrize("training", [True, False])
def test_member_forward_equals_nn_sequential(training, bns):
    ens = _ens(bns=bns)
    assert (ens._bn_prefix is not None) == (bns is BNS_PREFIX)  # both code paths are exercised
    _perturb(ens)
    with torch.no_grad():  # non-trivial running stats for eval mode
        for l in range(3):
            getattr(ens, f"running_mean_{l}").uniform_(-0.5, 0.5)
            getattr(ens, f"running_var_{l}").uniform_(0.5, 2.0)
    seqs = [ens.to_sequential(m) for m in range(4)]
    # independent construction check of the exported module: plain torch.nn layers
    none = bns.index("none")
    assert [type(x) for x in seqs[none]] == [nn.Linear, nn.ReLU] * 3 + [nn.Linear]
    assert seqs[1][2].affine is False and seqs[0][2].affine is True
    x = torch.randn(4, 9, 7, dtype=torch.float64)  # each member its own batch
    ens.train(training)
    for s in seqs:
        s.train(training)
    out = ens(x)
    for m in range(4):
        torch.testing.assert_close(out[m], seqs[m](x[m]), rtol=1e-12, atol=1e-12)
    if training:  # running statistics updated per member as BatchNorm1d updates them
        for m in [i for i, b in enumerate(bns) if b != "none"]:
            bn_mods = [mod for mod in seqs[m] if isinstance(mod, nn.BatchNorm1d)]
            for l, bn in enumerate(bn_mods):
                torch.testing.assert_close(getattr(ens, f"running_mean_{l}")[m], bn.running_mean)
                torch.testing.assert_close(getattr(ens, f"running_var_{l}")[m], bn.running_var)


def test_features_and_hidden_forward_agree():
    ens = _ens()
    _perturb(ens)
    ens.eval()
    x = torch.randn(10, 7, dtype=torch.float64)
    logits, feats = ens(x, return_features=True)
    assert logits.shape == (4, 10, 3) and len(feats) == 3 and feats[0].shape == (4, 10, 12)
    got = dict(ens.hidden_forward(x, slice(1, 3)))
    for l in (1, 2, 3):
        torch.testing.assert_close(got[l], feats[l - 1][1:3])
    torch.testing.assert_close(got["logits"], logits[1:3])
    # post-BN features of a non-affine member in train mode have zero batch mean
    ens.train()
    _, feats = ens(x, return_features=True)
    torch.testing.assert_close(feats[0][1].mean(0), torch.zeros(12, dtype=torch.float64), atol=1e-12, rtol=0)


def test_build_mlp_shape():
    seq = build_mlp(5, 8, 3, 2, "affine")
    assert seq(torch.randn(4, 5)).shape == (4, 2)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in seq) == 2

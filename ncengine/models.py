"""The thesis's MLP (Def. 3.2.1) as a batched ensemble, and as a plain ``torch.nn.Sequential``.

``phi_l(h) = BN(ReLU(W_l h + b_l))`` for ``l = 1..L-1`` and a linear last layer ``W_L h + b_L``; ``depth`` = L
counts the linear layers. :class:`MLPEnsemble` holds M independent members whose parameters carry a leading
member axis: ``weights[l]`` = ``W_l^T`` stored as (M, in, out) (so no transpose is copied in the backward
pass), ``b_l`` (M, out), BN ``gamma_l``/``beta_l`` (M, width), running statistics
(M, width). Each member has its own batch-norm mode: ``affine``, ``non_affine`` (gamma=1, beta=0: the
parameters exist but are frozen by ``affine_mask``; the trainer zeroes their gradient and their weight decay)
or ``none`` (no normalisation, selected by ``bn_mask``). Forward passes use ``torch.baddbmm`` and per-member
batch statistics, so member m computes exactly what :func:`build_mlp` computes with the same parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ncengine.config import BatchNorm


def build_mlp(
    input_dim: int, width: int, depth: int, num_classes: int, batch_norm: BatchNorm, *,
    bn_eps: float = 1e-5, bn_momentum: float = 0.1,
) -> nn.Sequential:
    """The straightforward single-run MLP: ``[Linear, ReLU, BatchNorm1d?] * (depth-1) + [Linear]``.

    Used as the reference in tests and in ``bench/bench_train.py``; :meth:`MLPEnsemble.to_sequential`
    copies a member into it.
    """
    mods: list[nn.Module] = []
    fan_in = input_dim
    for _ in range(depth - 1):
        mods += [nn.Linear(fan_in, width), nn.ReLU()]
        if batch_norm != "none":
            mods.append(nn.BatchNorm1d(width, eps=bn_eps, momentum=bn_momentum, affine=batch_norm == "affine"))
        fan_in = width
    mods.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*mods)


class MLPEnsemble(nn.Module):
    """M independent MLPs of one architecture, trained as one model.

    Args:
        input_dim: input dimension.
        width: hidden width d.
        depth: number of linear layers L (>= 2).
        num_classes: C.
        batch_norms: one BN mode per member (M = its length).
        seeds: one initialisation seed per member; member m's initial parameters depend on ``seeds[m]`` only
            (``torch.nn.Linear``'s default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for weights and biases,
            drawn in float64, then cast), so they do not depend on the other members.
        dtype: parameter dtype.
        bn_eps, bn_momentum: as ``torch.nn.BatchNorm1d``.
    """

    def __init__(
        self, input_dim: int, width: int, depth: int, num_classes: int, batch_norms: Sequence[BatchNorm],
        seeds: Sequence[int], *, dtype: torch.dtype = torch.float32, bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if len(batch_norms) != len(seeds) or not batch_norms:
            raise ValueError("need one batch_norm and one seed per member, at least one member")
        M = len(seeds)
        self.input_dim, self.width, self.depth, self.num_classes = input_dim, width, depth, num_classes
        self.bn_eps, self.bn_momentum = bn_eps, bn_momentum
        self.batch_norms = list(batch_norms)
        dims = [input_dim] + [width] * (depth - 1) + [num_classes]
        Ws = [torch.empty(M, o, i, dtype=torch.float64) for i, o in zip(dims[:-1], dims[1:])]  # nn.Linear layout
        bs = [torch.empty(M, o, dtype=torch.float64) for o in dims[1:]]
        for m, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            for W, b in zip(Ws, bs):
                k = 1.0 / math.sqrt(W.shape[2])
                W[m] = torch.rand(W.shape[1:], generator=g, dtype=torch.float64) * (2 * k) - k
                b[m] = torch.rand(b.shape[1:], generator=g, dtype=torch.float64) * (2 * k) - k
        # stored transposed, (M, in, out): member m's nn.Linear weight is weights[l][m].T
        self.weights = nn.ParameterList([nn.Parameter(W.transpose(1, 2).contiguous().to(dtype)) for W in Ws])
        self.biases = nn.ParameterList([nn.Parameter(b.to(dtype)) for b in bs])  # (M, out)
        L1 = depth - 1
        self.gammas = nn.ParameterList([nn.Parameter(torch.ones(M, width, dtype=dtype)) for _ in range(L1)])
        self.betas = nn.ParameterList([nn.Parameter(torch.zeros(M, width, dtype=dtype)) for _ in range(L1)])
        for l in range(L1):
            self.register_buffer(f"running_mean_{l}", torch.zeros(M, width, dtype=dtype))
            self.register_buffer(f"running_var_{l}", torch.ones(M, width, dtype=dtype))
        self.register_buffer("bn_mask", torch.tensor([bn != "none" for bn in batch_norms]))  # (M,)
        self.register_buffer("affine_mask", torch.tensor([bn == "affine" for bn in batch_norms]))  # (M,)
        self._all_bn = all(bn != "none" for bn in batch_norms)
        self._no_bn = all(bn == "none" for bn in batch_norms)
        # members with batch norm first, then those without: normalise a prefix and concatenate (cheaper than
        # computing batch norm for every member and selecting with torch.where)
        n_bn = sum(bn != "none" for bn in batch_norms)
        self._bn_prefix = n_bn if all(bn != "none" for bn in batch_norms[:n_bn]) else None

    @property
    def members(self) -> int:
        """M, the number of members."""
        return int(self.bn_mask.shape[0])

    def _bn(self, a: torch.Tensor, l: int, sl: slice = slice(None)) -> torch.Tensor:
        """Per-member batch norm of ``a`` (M, B, width) for members ``sl``.

        Training mode: batch statistics (biased variance), running statistics updated with the unbiased
        variance (``torch.nn.BatchNorm1d`` semantics). Eval mode: running statistics.
        """
        rm, rv = getattr(self, f"running_mean_{l}")[sl], getattr(self, f"running_var_{l}")[sl]  # (M, width)
        M, B, w = a.shape
        # (M, B, w) -> (B, M*w): per-member batch norm is batch norm over M*w channels; torch's fused kernel
        # then gives BatchNorm1d's exact arithmetic (and its running-statistics update, in place on the views).
        x = a.transpose(0, 1).reshape(B, M * w)
        y = F.batch_norm(
            x, rm.view(-1), rv.view(-1), self.gammas[l][sl].reshape(-1), self.betas[l][sl].reshape(-1),
            training=self.training, momentum=self.bn_momentum, eps=self.bn_eps,
        )
        return y.view(B, M, w).transpose(0, 1)

    def forward(self, x: torch.Tensor, *, return_features: bool = False):  # noqa: ANN201
        """Logits of every member.

        Args:
            x: inputs, (M, B, input_dim) (each member its own batch) or (B, input_dim) (shared batch).
            return_features: also return the post-BN features of every hidden layer.

        Returns:
            logits (M, B, C); with ``return_features``, ``(logits, [h_1, ..., h_{L-1}])``, each (M, B, width).
        """
        M = self.members
        h = x if x.dim() == 3 else x.unsqueeze(0).expand(M, -1, -1)
        feats = []
        for l in range(self.depth - 1):
            a = torch.relu(torch.baddbmm(self.biases[l].unsqueeze(1), h, self.weights[l]))
            if self._no_bn:
                h = a
            elif self._all_bn:
                h = self._bn(a, l)
            elif self._bn_prefix is not None:
                k = self._bn_prefix
                h = torch.cat([self._bn(a[:k], l, slice(0, k)), a[k:]])
            else:
                h = torch.where(self.bn_mask.view(M, 1, 1), self._bn(a, l), a)
            if return_features:
                feats.append(h)
        logits = torch.baddbmm(self.biases[-1].unsqueeze(1), h, self.weights[-1])
        return (logits, feats) if return_features else logits

    def hidden_forward(self, x: torch.Tensor, members: slice = slice(None)):  # noqa: ANN201
        """Yield ``(l, h_l)`` for l = 1..L-1 (post-BN features, (M', B, width)), then ``("logits", logits)``.

        Runs only the members in ``members`` (a slice) on a shared input ``x`` (B, input_dim), and keeps one
        layer's activations alive at a time (for measuring big sets in eval mode).
        """
        bn_mask = self.bn_mask[members]
        M = int(bn_mask.shape[0])
        h = x.unsqueeze(0).expand(M, -1, -1)
        for l in range(self.depth - 1):
            a = torch.relu(
                torch.baddbmm(self.biases[l][members].unsqueeze(1), h, self.weights[l][members])
            )
            h = a if self._no_bn else torch.where(bn_mask.view(M, 1, 1), self._bn(a, l, members), a)
            yield l + 1, h
        yield "logits", torch.baddbmm(
            self.biases[-1][members].unsqueeze(1), h, self.weights[-1][members]
        )

    @torch.no_grad()
    def to_sequential(self, m: int) -> nn.Sequential:
        """A copy of member ``m`` as the :func:`build_mlp` ``nn.Sequential`` (same dtype, CPU)."""
        seq = build_mlp(
            self.input_dim, self.width, self.depth, self.num_classes, self.batch_norms[m],
            bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
        ).to(self.weights[0].dtype)
        linears = [mod for mod in seq if isinstance(mod, nn.Linear)]
        bns = [mod for mod in seq if isinstance(mod, nn.BatchNorm1d)]
        for l, lin in enumerate(linears):
            lin.weight.copy_(self.weights[l][m].T)
            lin.bias.copy_(self.biases[l][m])
        for l, bn in enumerate(bns):
            if bn.affine:
                bn.weight.copy_(self.gammas[l][m])
                bn.bias.copy_(self.betas[l][m])
            bn.running_mean.copy_(getattr(self, f"running_mean_{l}")[m])
            bn.running_var.copy_(getattr(self, f"running_var_{l}")[m])
        return seq

"""Training engine: batched ensembles of the thesis's MLP (Def. 3.2.1) with exact ``torch.optim.SGD`` semantics.

:func:`run` groups configs into bundles (:func:`ncengine.sweep.bundles`: runs sharing dataset and architecture),
trains each bundle as one :class:`~ncengine.models.MLPEnsemble` and returns one :class:`RunResult` per config,
in input order. Per member: its own initialisation seed, data order (:func:`epoch_permutation`), batch-norm
mode, learning rate, momentum and weight decay. The update is ``torch.optim.SGD``'s (weight decay added to the
gradient before momentum, no dampening) with ``MultiStepLR``'s step decay, applied to the stacked tensors, so
each member matches the same run trained alone with ``torch.nn`` + ``torch.optim.SGD`` to float tolerance.

Measurements (``measure.every`` epochs and at the end) run on the whole training set in eval mode: training
loss and accuracy and :func:`ncengine.metrics.measure` of the post-BN features (last layer with the classifier
``W_L, b_L``, or every hidden layer), and at the end the effective depth (thesis Def. 3.2.2).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from ncengine import metrics
from ncengine.config import RunConfig
from ncengine.data import Dataset, load
from ncengine.errors import InputError
from ncengine.jsonsafe import json_safe
from ncengine.models import MLPEnsemble
from ncengine.sweep import DEFAULT_MAX_BUNDLE_SIZE, bundles

#: members x samples x width kept alive at once while measuring (bounds eval memory)
EVAL_ELEMENTS = 50_000_000
CHECKPOINT_FORMAT = 1

Progress = Callable[[int, int, "list[list[dict[str, Any]]] | None"], None]


class RunResult(BaseModel):
    """Outcome of one run; JSON-safe (``model_dump(mode="json")``), non-finite floats stored as ``None``.

    Attributes:
        config: the run's config.
        history: one dict per measured (epoch, layer): ``epoch`` (1-based, completed epochs), ``layer``
            (1..L-1: the post-BN output of ``phi_layer``; ``L-1`` feeds the classifier), ``train_loss`` and
            ``train_accuracy`` (whole training set, eval mode) and the keys of ``ncengine.metrics.measure``
            (with the classifier's weights at the last layer only).
        final: the last-layer dict at the end of training plus ``converged`` (training accuracy == 1, the
            thesis discards the others) and ``effective_depth`` (thesis Def. 3.2.2, from every layer's NCC
            error at the end; ``None`` when no layer reaches ``measure.effective_depth_eps``).
    """

    model_config = ConfigDict(frozen=True)

    config: RunConfig
    history: list[dict[str, Any]]
    final: dict[str, Any]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` = CUDA when available, else CPU (CUDA is touched only when this is called)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The data order of run ``seed`` in epoch ``epoch`` (0-based): a permutation of ``range(n)``, int64, CPU.

    Stateless (a function of ``(seed, epoch)`` only), so a resumed run draws the same order.
    """
    s = int(np.random.SeedSequence([int(seed), int(epoch), 0x5EED]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(s))


def batch_starts(n: int, batch_size: int) -> list[int]:
    """Minibatch start offsets of an epoch; a trailing batch of a single sample is dropped (batch norm)."""
    starts = list(range(0, n, batch_size))
    if n - starts[-1] == 1 and len(starts) > 1:
        starts.pop()
    return starts


def lr_at_epoch(cfg: RunConfig, epoch: int) -> float:
    """Learning rate in epoch ``epoch`` (0-based), computed as ``MultiStepLR`` does (multiply by gamma at each
    milestone epoch ``round(fraction * epochs)``)."""
    lr = cfg.optim.lr
    for e in range(1, epoch + 1):
        for m in cfg.schedule.milestone_epochs():
            if m == e:
                lr = lr * cfg.schedule.gamma
    return lr

class _Bundle:
    """One ensemble under training: model, momentum buffers and per-member optimiser constants."""

    def __init__(self, configs: list[RunConfig], data: Dataset, device: torch.device) -> None:
        c0 = configs[0]
        self.configs = configs
        self.dtype = torch.float64 if c0.dtype == "float64" else torch.float32
        self.device = device
        self.X = data.X.to(device=device, dtype=self.dtype)  # (N, d_in)
        self.y = data.y.to(device)  # (N,)
        self.N = len(data)
        self.model = MLPEnsemble(
            data.input_dim, c0.model.width, c0.model.depth, data.num_classes,
            [c.model.batch_norm for c in configs], [c.seed for c in configs], dtype=self.dtype,
            bn_eps=c0.model.bn_eps, bn_momentum=c0.model.bn_momentum,
        ).to(device)
        M = len(configs)

        def vec(vals: list[float]) -> torch.Tensor:
            return torch.tensor(vals, dtype=self.dtype, device=device)

        wd = vec([c.optim.weight_decay for c in configs])
        wd_all = vec([c.optim.weight_decay * (c.optim.weight_decay_on == "all") for c in configs])
        affine = self.model.affine_mask.to(self.dtype)
        self.momentum = vec([c.optim.momentum for c in configs])
        # (param, per-member weight decay, per-member gradient mask or None); masks freeze non-affine gamma/beta
        self.groups: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor | None]] = []
        for W in self.model.weights:
            self.groups.append((W, wd, None))
        for b in self.model.biases:
            self.groups.append((b, wd_all, None))
        for g in self.model.gammas:
            self.groups.append((g, wd * affine, affine))
        for be in self.model.betas:
            self.groups.append((be, wd_all * affine, affine))
        self.bufs = [torch.zeros_like(p) for p, _, _ in self.groups]
        self.M = M

    @staticmethod
    def _bshape(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return v.view((-1,) + (1,) * (p.dim() - 1))

    def train_epoch(self, epoch: int, interrupt: Callable[[], None] | None = None) -> None:
        """One epoch (0-based index ``epoch``) of minibatch SGD for every member; ``interrupt()`` (optional) is
        called before every minibatch, and an exception it raises stops the epoch there."""
        model, X, y = self.model, self.X, self.y
        model.train()
        perms = torch.stack([epoch_permutation(c.seed, epoch, self.N) for c in self.configs]).to(self.device)
        lr = torch.tensor([lr_at_epoch(c, epoch) for c in self.configs], dtype=self.dtype, device=self.device)
        B = self.configs[0].optim.batch_size
        shaped = [
            (p, self._bshape(wd, p), None if mask is None else self._bshape(mask, p), self._bshape(lr, p),
             self._bshape(self.momentum, p), buf)
            for (p, wd, mask), buf in zip(self.groups, self.bufs)
        ]
        for s in batch_starts(self.N, B):
            if interrupt is not None:
                interrupt()
            idx = perms[:, s : s + B]  # (M, b)
            logits = model(X[idx])  # (M, b, C)
            yb = y[idx]  # (M, b)
            loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(idx.shape)
            for p, *_ in shaped:
                p.grad = None
            loss.mean(1).sum().backward()  # member m's gradient = grad of its own mean batch loss
            with torch.no_grad():
                for p, wd, mask, lr_p, mom, buf in shaped:
                    d_p = p.grad  # owned by us until the next step: update in place
                    if mask is not None:
                        d_p.mul_(mask)  # frozen (non-affine) gamma/beta: no gradient
                    d_p.addcmul_(p, wd)  # torch.optim.SGD: grad + weight_decay * param
                    buf.mul_(mom).add_(d_p)  # momentum buffer (first step: 0 * m + d_p = d_p, as torch)
                    p.addcmul_(buf, lr_p, value=-1.0)

    @torch.no_grad()
    def evaluate(self, layers: str) -> list[list[dict[str, Any]]]:
        """Measure every member on the whole training set in eval mode.

        Returns:
            per member, a list of dicts for layers 1..L-1 (``layers="all"``) or for L-1 only (``"last"``).
        """
        model = self.model
        model.eval()
        L, C = model.depth, model.num_classes
        out: list[list[dict[str, Any]]] = [[] for _ in range(self.M)]
        group = max(1, EVAL_ELEMENTS // max(1, self.N * max(model.width, model.num_classes)))
        for start in range(0, self.M, group):
            sl = slice(start, min(self.M, start + group))
            for l, h in model.hidden_forward(self.X, sl):
                if l == "logits":
                    logits = h.double()  # (M', N, C)
                elif l == L - 1:
                    h_last = h  # (M', N, width): features feeding the classifier
                elif layers == "all":
                    for j in range(h.shape[0]):
                        d = metrics.measure(h[j], self.y, num_classes=C).to_dict()
                        out[start + j].append({"layer": l, **d})
            loss = torch.stack([F.cross_entropy(lg, self.y) for lg in logits])  # (M',)
            acc = (logits.argmax(-1) == self.y).double().mean(1)  # (M',)
            for j in range(h_last.shape[0]):
                m = start + j
                d = metrics.measure(
                    h_last[j], self.y, weights=model.weights[-1][m].T, bias=model.biases[-1][m], num_classes=C
                ).to_dict()
                out[m].append({"layer": L - 1, **d})
                for rec in out[m]:
                    rec["train_loss"] = float(loss[j])
                    rec["train_accuracy"] = float(acc[j])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "bufs": [b.cpu() for b in self.bufs]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.model.load_state_dict(sd["model"])
        for b, s in zip(self.bufs, sd["bufs"]):
            b.copy_(s)


def _effective_depth(records: list[dict[str, Any]], eps: float) -> int | None:
    """Thesis Def. 3.2.2: the smallest layer whose NCC error (1 - ``ncc_accuracy``) is <= eps."""
    recs = sorted(records, key=lambda r: r["layer"])
    errors = [1.0 - float(r["ncc_accuracy"]) for r in recs]
    depth = metrics.effective_depth(errors, eps)
    return None if depth is None else int(depth)


def _save(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save leaves the previous checkpoint


def run(
    configs: list[RunConfig],
    *,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    max_bundle_size: int = DEFAULT_MAX_BUNDLE_SIZE,
    interrupt: Callable[[], None] | None = None,
) -> list[RunResult]:
    """Train ``configs`` (bundled into batched ensembles) and measure them.

    Args:
        configs: the runs (RunConfig objects or their JSON dicts).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        progress: called after every epoch as ``progress(epoch, total_epochs, metrics_or_None)``; epochs count
            over all bundles (trained one after another). ``metrics_or_None`` is ``None`` when nothing was
            measured at that epoch, else a list aligned with ``configs`` whose entry is the list of history
            dicts recorded at that epoch for that run (``[]`` for runs of other bundles). An exception it
            raises (e.g. to cancel) propagates; the latest checkpoint stays on disk.
        checkpoint_path: if given, a checkpoint is written there every ``checkpoint_every`` epochs and after
            each bundle; if the file exists, training resumes from it and ends with the same results as an
            uninterrupted run.
        checkpoint_every: epochs between checkpoints (``None``: only after each bundle).
        max_bundle_size: most members per ensemble.
        interrupt: called before every minibatch (cheap: e.g. read a flag); an exception it raises stops
            training mid-epoch and propagates, so a cancel or shutdown never waits for a long epoch to end. The
            latest checkpoint stays on disk, and a resumed run repeats the interrupted epoch exactly.

    Returns:
        One :class:`RunResult` per config, in input order.

    Raises:
        InputError: empty ``configs``, ``checkpoint_every < 1``, or a checkpoint of other configs.
        pydantic.ValidationError: a config given as a dict is invalid (the error names the field).
    """
    cfgs = [c if isinstance(c, RunConfig) else RunConfig.model_validate(c) for c in configs]
    if not cfgs:
        raise InputError("configs", "no runs given", expected="at least one RunConfig")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise InputError("checkpoint_every", f"{checkpoint_every}", expected=">= 1 or None")
    dev = resolve_device(device)
    groups = bundles(cfgs, max_bundle_size=max_bundle_size)
    # position of every config in the input list (configs may repeat: take them in order)
    remaining = list(range(len(cfgs)))
    index_groups: list[list[int]] = []
    for bi, g in enumerate(groups):
        idx = []
        for c in g:
            k = next(i for i in remaining if cfgs[i] is c)
            remaining.remove(k)
            idx.append(k)
        # members with batch norm first (the ensemble then normalises a prefix instead of masking)
        order = sorted(range(len(g)), key=lambda j: g[j].model.batch_norm == "none")
        groups[bi] = [g[j] for j in order]
        index_groups.append([idx[j] for j in order])
    total = sum(g[0].schedule.epochs for g in groups)
    fingerprint = [c.model_dump(mode="json") for c in cfgs]

    results: dict[int, dict[str, Any]] = {}
    start_bundle, start_epoch, bundle_state, histories = 0, 0, None, None
    path = os.fspath(checkpoint_path) if checkpoint_path is not None else None
    if path is not None and os.path.exists(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck.get("format") != CHECKPOINT_FORMAT or ck.get("configs") != fingerprint:
            raise InputError("checkpoint_path", f"{path} holds a checkpoint of other runs", expected="same configs")
        results = {int(k): v for k, v in ck["results"].items()}
        start_bundle, start_epoch = ck["bundle"], ck["epoch"]
        bundle_state, histories = ck["state"], ck["histories"]

    def checkpoint(bi: int, epoch: int, state: dict[str, Any] | None, hist: list[list[dict]] | None) -> None:
        if path is not None:
            _save(path, {"format": CHECKPOINT_FORMAT, "configs": fingerprint, "results": results,
                         "bundle": bi, "epoch": epoch, "state": state, "histories": hist})

    done_epochs = sum(groups[i][0].schedule.epochs for i in range(start_bundle))
    for bi in range(start_bundle, len(groups)):
        g, idx = groups[bi], index_groups[bi]
        c0 = g[0]
        E = c0.schedule.epochs
        bundle = _Bundle(g, load(c0.data), dev)
        hist: list[list[dict[str, Any]]] = [[] for _ in g]
        e0 = 0
        if bi == start_bundle and bundle_state is not None:
            bundle.load_state_dict(bundle_state)
            hist, e0 = histories, start_epoch
        for epoch in range(e0, E):
            bundle.train_epoch(epoch, interrupt)
            done = epoch + 1
            every = c0.measure.every
            recs = None
            if done == E or (every and done % every == 0):
                recs = bundle.evaluate(c0.measure.layers)
                recs = [[json_safe({"epoch": done, **r}) for r in member] for member in recs]
                for h, r in zip(hist, recs):
                    h.extend(r)
            if done == E:
                final_recs = recs
                if c0.measure.layers == "last":
                    final_recs = [[json_safe(r) for r in m] for m in bundle.evaluate("all")]
                for m, (cfg, k) in enumerate(zip(g, idx)):
                    last = dict(recs[m][-1])
                    last["converged"] = bool(last["train_accuracy"] == 1.0)
                    last["effective_depth"] = _effective_depth(final_recs[m], cfg.measure.effective_depth_eps)
                    results[k] = {"history": hist[m], "final": last}
                checkpoint(bi + 1, 0, None, None)
            elif checkpoint_every is not None and done % checkpoint_every == 0:
                checkpoint(bi, done, bundle.state_dict(), hist)
            if progress is not None:
                report = None
                if recs is not None:
                    report = [[] for _ in cfgs]
                    for m, k in enumerate(idx):
                        report[k] = recs[m]
                progress(done_epochs + done, total, report)
        done_epochs += E
    return [RunResult(config=c, history=results[i]["history"], final=results[i]["final"]) for i, c in enumerate(cfgs)]

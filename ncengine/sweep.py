"""Sweeps: a base :class:`RunConfig`, a grid over dotted keys and seeds, expanded into runs and packed into bundles.

Example::

    spec = SweepSpec(grid={"model.batch_norm": ["affine", "none"], "optim.weight_decay": [1e-4, 1e-3]},
                     seeds=[0, 1])
    configs = expand(spec)            # 2 * 2 * 2 = 8 RunConfigs
    for bundle in bundles(configs):   # runs sharing architecture + dataset, trained as one ensemble
        ...

Presets reproduce the thesis's experiments: ``thesis-fig3.1`` (depth 6, BN affine / non-affine / none x weight
decay 1e-4 ... 1e-2, last layer) and ``thesis-fig3.3`` (depth 15, affine BN, every layer, effective depth).
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ncengine.config import MAX_SEED, RunConfig

#: at most this many runs in one sweep (grid size x seeds)
MAX_SWEEP_RUNS = 1_000
#: at most this many values for one grid key
MAX_GRID_VALUES = 100
MAX_SEEDS = 100
#: default number of members trained together as one batched ensemble
DEFAULT_MAX_BUNDLE_SIZE = 32

PRESETS = ("thesis-fig3.1", "thesis-fig3.3")
#: the thesis's weight-decay grid (Figures 3.1 and 3.3)
THESIS_WEIGHT_DECAYS = (1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 7e-3, 1e-2)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d[p]
    d[parts[-1]] = value


def _check_key(key: str) -> None:
    """Raise ``ValueError`` unless ``key`` is a dotted path to a leaf field of :class:`RunConfig`."""
    model: Any = RunConfig
    parts = key.split(".")
    for i, p in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or p not in fields:
            raise ValueError(f"grid key {key!r}: unknown field {'.'.join(parts[: i + 1])!r}")
        ann = fields[p].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is not None:
        raise ValueError(f"grid key {key!r} names a section; name one of its fields (e.g. {key}.<field>)")


class SweepSpec(BaseModel):
    """A sweep: ``base`` config, a ``grid`` over dotted keys (cartesian product, in key order), and ``seeds``.

    Attributes:
        base: the config every run starts from.
        grid: ``{"optim.weight_decay": [1e-4, 1e-3], ...}``; each key must name a leaf field of RunConfig,
            each list must be non-empty, and every value must validate at that field.
        seeds: run seeds (``RunConfig.seed``); each grid point is run once per seed.

    Validation errors name the field: pydantic's ``loc`` (``grid``, ``seeds``, ``base.optim.lr``) and, for
    grid entries, the message starts with the dotted key and the value's index.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: RunConfig = RunConfig()
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=MAX_SEEDS)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if any(s < 0 or s > MAX_SEED for s in v):
            raise ValueError(f"seeds must lie in [0, {MAX_SEED}]")
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_shape(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            _check_key(key)
            if not values:
                raise ValueError(f"grid key {key!r}: empty list of values")
            if len(values) > MAX_GRID_VALUES:
                raise ValueError(f"grid key {key!r}: more than {MAX_GRID_VALUES} values")
        return v

    @model_validator(mode="after")
    def _grid_values(self) -> SweepSpec:
        size = len(self.seeds)
        for values in self.grid.values():
            size *= len(values)
        if size > MAX_SWEEP_RUNS:
            raise ValueError(f"grid x seeds gives {size} runs, more than {MAX_SWEEP_RUNS}")
        base = self.base.model_dump(mode="json")
        for key, values in self.grid.items():
            for i, value in enumerate(values):
                d = RunConfig.model_validate(base).model_dump(mode="json")
                _set_dotted(d, key, value)
                try:
                    RunConfig.model_validate(d)
                except ValidationError as exc:
                    msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                    raise ValueError(f"grid.{key}[{i}] = {value!r}: {msgs}") from None
        return self

    def size(self) -> int:
        """Number of runs the sweep expands to."""
        n = len(self.seeds)
        for values in self.grid.values():
            n *= len(values)
        return n


def expand(spec: SweepSpec | dict[str, Any]) -> list[RunConfig]:
    """Expand a sweep into run configs: cartesian product of the grid (keys in order, last fastest), then seeds.

    Args:
        spec: a :class:`SweepSpec` or its JSON dict.

    Returns:
        ``spec.size()`` validated :class:`RunConfig` objects, seeds innermost.

    Raises:
        pydantic.ValidationError: the spec is invalid (the error names the field).
    """
    spec = spec if isinstance(spec, SweepSpec) else SweepSpec.model_validate(spec)
    base = spec.base.model_dump(mode="json")
    keys = list(spec.grid)
    out = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        for seed in spec.seeds:
            d = RunConfig.model_validate(base).model_dump(mode="json")
            for k, v in zip(keys, combo):
                _set_dotted(d, k, v)
            d["seed"] = seed
            out.append(RunConfig.model_validate(d))
    return out


def bundle_key(cfg: RunConfig) -> str:
    """What runs must share to be trained as one ensemble: dataset, architecture, batch size, schedule,
    measurement and dtype. Batch-norm mode, learning rate, momentum, weight decay and seed may differ."""
    d = cfg.model_dump(mode="json")
    d.pop("seed")
    d["model"].pop("batch_norm")
    for k in ("lr", "momentum", "weight_decay", "weight_decay_on"):
        d["optim"].pop(k)
    return json.dumps(d, sort_keys=True)


def bundles(configs: list[RunConfig], max_bundle_size: int = DEFAULT_MAX_BUNDLE_SIZE) -> list[list[RunConfig]]:
    """Group configs into ensemble bundles (same :func:`bundle_key`), in first-appearance order, each at most
    ``max_bundle_size`` long. Every config appears in exactly one bundle, in its original relative order."""
    if max_bundle_size < 1:
        raise ValueError("max_bundle_size must be >= 1")
    groups: dict[str, list[RunConfig]] = {}
    for c in configs:
        groups.setdefault(bundle_key(c), []).append(c)
    out = []
    for g in groups.values():
        out += [g[i : i + max_bundle_size] for i in range(0, len(g), max_bundle_size)]
    return out


def preset(name: Literal["thesis-fig3.1", "thesis-fig3.3"], scale: Literal["small", "full"] = "full") -> SweepSpec:
    """The thesis's sweeps.

    ``thesis-fig3.1``: teacher data (N=10000, C=10, input 32), MLP depth 6, width 256, batch norm affine /
    non_affine / none x weight decay (1e-4, 3e-4, 5e-4, 1e-3, 3e-3, 7e-3, 1e-2): 21 runs, 300 epochs, last layer.
    ``thesis-fig3.3``: the same data, depth 15, affine BN, the same weight decays, every layer measured.
    ``scale="small"``: N=500; width 64, 60 epochs (fig3.1) / width 128, 160 epochs (fig3.3); for tests and demos.

    Raises:
        InputError: unknown preset or scale (field ``preset`` / ``scale``).
    """
    from ncengine.errors import InputError

    if name not in PRESETS:
        raise InputError("preset", f"unknown preset {name!r}", expected=" | ".join(PRESETS))
    if scale not in ("small", "full"):
        raise InputError("scale", f"unknown scale {scale!r}", expected="small | full")
    small = scale == "small"
    fig31 = name == "thesis-fig3.1"
    base: dict[str, Any] = {
        "data": {"name": "teacher", "n": 500 if small else 10_000},
        "model": {"depth": 6 if fig31 else 15, "width": (64 if fig31 else 128) if small else 256,
                  "batch_norm": "affine"},
        "schedule": {"epochs": (60 if fig31 else 160) if small else 300},
        "measure": {"every": 20 if small else 10, "layers": "last" if fig31 else "all"},
    }
    grid: dict[str, list[Any]] = {"optim.weight_decay": list(THESIS_WEIGHT_DECAYS)}
    if fig31:
        grid = {"model.batch_norm": ["affine", "non_affine", "none"], **grid}
    return SweepSpec(base=RunConfig.model_validate(base), grid=grid, seeds=[0])

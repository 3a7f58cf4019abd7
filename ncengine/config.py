"""Run configuration for the training engine: pydantic models, validated the same way by the API and the worker.

A :class:`RunConfig` describes one training run (thesis Ch. 3): a dataset (``data``), the MLP of thesis
Def. 3.2.1 (``model``), SGD with momentum and weight decay (``optim``), a step learning-rate schedule
(``schedule``) and the measurement cadence (``measure``). The service stores ``model_dump(mode="json")`` and
re-validates it with ``RunConfig.model_validate``; every validation error names the dotted field
(``optim.weight_decay``), as pydantic reports ``loc``.

Limits (module-level constants below) refuse hostile specs before any memory is allocated.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# --- limits: a spec beyond these is refused at validation time --------------------------------------------
MAX_EPOCHS = 5_000
MAX_DEPTH = 64
MAX_WIDTH = 4_096
MAX_SAMPLES = 200_000
MAX_INPUT_DIM = 4_096
MAX_CLASSES = 1_000
MAX_TEACHER_DEPTH = 16
MAX_BATCH_SIZE = 65_536
MAX_MILESTONES = 16
MAX_SEED = 2**31 - 1
#: the product ``N * width * depth`` bounds the memory of one member's full-set forward pass.
MAX_SAMPLES_X_WIDTH_X_DEPTH = 2_000_000_000

BatchNorm = Literal["affine", "non_affine", "none"]
DatasetName = Literal["teacher", "conic", "digits"]

#: default sample count of the synthetic datasets (the issue's N=10000); ``digits`` has 1797 real images.
DEFAULT_SYNTHETIC_SAMPLES = 10_000
DEFAULT_SYNTHETIC_CLASSES = 10
DEFAULT_SYNTHETIC_INPUT_DIM = 32


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Dataset. ``teacher``/``conic`` are synthetic and class-balanced; ``digits`` is scikit-learn's 8x8 digits.

    Attributes:
        name: ``teacher`` (Gaussian inputs labelled by a random MLP), ``conic`` (conic-hull classes, thesis
            §3.1) or ``digits`` (1797 real images, 64 features, 10 classes, standardised).
        n: number of samples N; ``None`` = dataset default (10000 synthetic, 1797 digits). Synthetic sets
            draw ``n // num_classes`` samples per class; for ``digits`` a seeded random subset of size n.
        num_classes: C for synthetic data (``None`` = 10); must stay ``None`` or 10 for ``digits``.
        input_dim: input dimension for synthetic data (``None`` = 32); ``None`` or 64 for ``digits``.
        teacher_depth: linear layers of the teacher MLP (``teacher`` only).
        teacher_width: hidden width of the teacher MLP (``teacher`` only).
        seed: seed of the dataset (independent of the run seed, so runs of a sweep share the data).
    """

    name: DatasetName = "teacher"
    n: int | None = Field(default=None, ge=2, le=MAX_SAMPLES)
    num_classes: int | None = Field(default=None, ge=2, le=MAX_CLASSES)
    input_dim: int | None = Field(default=None, ge=1, le=MAX_INPUT_DIM)
    teacher_depth: int = Field(default=3, ge=1, le=MAX_TEACHER_DEPTH)
    teacher_width: int = Field(default=256, ge=1, le=MAX_WIDTH)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)

    @field_validator("num_classes")
    @classmethod
    def _digits_classes(cls, v: int | None, info):  # noqa: ANN001
        if info.data.get("name") == "digits" and v not in (None, 10):
            raise ValueError("digits has exactly 10 classes")
        return v

    @field_validator("input_dim")
    @classmethod
    def _digits_dim(cls, v: int | None, info):  # noqa: ANN001
        if info.data.get("name") == "digits" and v not in (None, 64):
            raise ValueError("digits has exactly 64 input features")
        return v

    @field_validator("n")
    @classmethod
    def _n_vs_name(cls, v: int | None, info):  # noqa: ANN001
        if v is not None and info.data.get("name") == "digits" and v > 1797:
            raise ValueError("digits has 1797 samples")
        return v


class ModelConfig(_Section):
    """The thesis's MLP (Def. 3.2.1): ``phi_l(h) = BN(ReLU(W_l h + b_l))`` for l < L, last layer linear.

    Attributes:
        depth: L, the number of linear layers (>= 2: at least one hidden layer).
        width: hidden width d.
        batch_norm: ``affine`` (learned gamma, beta), ``non_affine`` (gamma=1, beta=0 fixed) or ``none``.
        bn_eps: epsilon of batch norm (torch default 1e-5).
        bn_momentum: running-statistics momentum of batch norm (torch default 0.1).
    """

    depth: int = Field(default=6, ge=2, le=MAX_DEPTH)
    width: int = Field(default=256, ge=1, le=MAX_WIDTH)
    batch_norm: BatchNorm = "affine"
    bn_eps: float = Field(default=1e-5, gt=0, le=1.0)
    bn_momentum: float = Field(default=0.1, gt=0, le=1.0)


class OptimConfig(_Section):
    """SGD with momentum (``torch.optim.SGD`` semantics: weight decay added to the gradient before momentum).

    Attributes:
        lr: initial learning rate (thesis: 0.0679).
        momentum: heavy-ball momentum (0.9), no dampening, no Nesterov.
        weight_decay: L2 coefficient lambda.
        weight_decay_on: ``all`` parameters (default) or ``weights_and_gamma`` (linear weights and BN gamma
            only, thesis eq. 2.1).
        batch_size: minibatch size (128). A final batch of size 1 is dropped (batch norm needs 2 samples).
    """

    lr: float = Field(default=0.0679, gt=0, le=100.0)
    momentum: float = Field(default=0.9, ge=0, lt=1.0)
    weight_decay: float = Field(default=5e-4, ge=0, le=10.0)
    weight_decay_on: Literal["all", "weights_and_gamma"] = "all"
    batch_size: int = Field(default=128, ge=2, le=MAX_BATCH_SIZE)


class ScheduleConfig(_Section):
    """Epochs and step learning-rate decay (``torch.optim.lr_scheduler.MultiStepLR`` semantics).

    Attributes:
        epochs: number of passes over the training set.
        milestones: epoch fractions in (0, 1) where the learning rate is multiplied by ``gamma``; the
            milestone epoch is ``round(fraction * epochs)``.
        gamma: decay factor (0.1).
    """

    epochs: int = Field(default=300, ge=1, le=MAX_EPOCHS)
    milestones: tuple[float, ...] = Field(default=(1 / 3, 2 / 3), max_length=MAX_MILESTONES)
    gamma: float = Field(default=0.1, gt=0, le=1.0)

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not (0.0 < f < 1.0) for f in v):
            raise ValueError("milestones are epoch fractions strictly between 0 and 1")
        if list(v) != sorted(v):
            raise ValueError("milestones must be increasing")
        return v

    def milestone_epochs(self) -> list[int]:
        """Epoch indices (``MultiStepLR`` milestones) where the learning rate decays."""
        return [int(round(f * self.epochs)) for f in self.milestones]


class MeasureConfig(_Section):
    """What is measured during training (on the whole training set, eval mode).

    Attributes:
        every: measure every this many epochs (and always at the end); 0 = only at the end.
        layers: ``last`` (features feeding the classifier, with its weights and bias) or ``all`` hidden layers.
        effective_depth_eps: eps of the effective depth (thesis Def. 3.2.2): smallest layer with NCC error <= eps.
    """

    every: int = Field(default=10, ge=0, le=MAX_EPOCHS)
    layers: Literal["last", "all"] = "last"
    effective_depth_eps: float = Field(default=0.01, ge=0, le=1.0)


class RunConfig(_Section):
    """One training run. ``seed`` sets the initialisation and the data order (each run its own permutation).

    Attributes:
        data, model, optim, schedule, measure: the sections above.
        seed: run seed (initialisation and minibatch order).
        dtype: parameter and compute dtype (``float64`` is for exactness tests).
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    measure: MeasureConfig = MeasureConfig()
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    dtype: Literal["float32", "float64"] = "float32"

    @model_validator(mode="after")
    def _size_limit(self) -> RunConfig:
        n = self.data.n or DEFAULT_SYNTHETIC_SAMPLES
        if n * self.model.width * self.model.depth > MAX_SAMPLES_X_WIDTH_X_DEPTH:
            raise ValueError(
                f"data.n * model.width * model.depth = {n * self.model.width * self.model.depth} exceeds "
                f"{MAX_SAMPLES_X_WIDTH_X_DEPTH}"
            )
        return self

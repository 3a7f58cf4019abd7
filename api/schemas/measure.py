"""Request/response models of ``POST /measure`` (JSON form; the multipart form carries the same names)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ncengine.config import MAX_CLASSES

#: the array inputs of ``ncengine.metrics.measure``, in its argument order
ARRAY_FIELDS = ("features", "labels", "weights", "bias", "test_features", "test_labels")


#: the measure options, shared by ``MeasureOptions`` (the ``options`` object) and the top level of
#: ``MeasureRequest`` (the same keys the multipart form takes as single fields)
NumClasses = Annotated[int | None, Field(ge=2, le=MAX_CLASSES, description="C; default max(label) + 1.")]
Center = Annotated[Literal["none", "global_mean"], Field(
    description="Cosines of raw features (thesis) or of features minus the global mean.")]
GlobalMean = Annotated[Literal["class_mean", "sample"], Field(
    description="mu_G = mean of class means (Papyan 2020) or the sample mean.")]
RemapLabels = Annotated[bool, Field(description="Map the distinct label ids to 0..K-1 in sorted order.")]


class MeasureOptions(BaseModel):
    """Options of ``ncengine.metrics.measure`` (see docs/metrics.md)."""

    model_config = ConfigDict(extra="forbid")

    num_classes: NumClasses = None
    center: Center = "none"
    global_mean: GlobalMean = "class_mean"
    remap_labels: RemapLabels = False


#: option names, in ``MeasureOptions`` order (multipart fields and top-level JSON keys of the same names)
OPTION_FIELDS = tuple(MeasureOptions.model_fields)


class MeasureRequest(BaseModel):
    """Arrays as nested JSON lists. For anything large, upload files as multipart instead.

    The options go in ``options`` or, like the multipart form's single fields, at the top level
    (``"remap_labels": true``); a top-level key overrides the same key of ``options``.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "features": [[1.0, 0.0], [0.9, 0.1], [-0.5, 0.87], [-0.45, 0.9], [-0.5, -0.87], [-0.55, -0.8]],
        "labels": [0, 0, 1, 1, 2, 2],
        "weights": [[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]],
        "options": {"center": "none"}}]})

    features: list[list[float]] = Field(description="(N, d) last-layer features.")
    labels: list[Any] = Field(description="(N,) integer class ids in 0..C-1.")
    weights: list[list[float]] | None = Field(None, description="(C, d) classifier weights W.")
    bias: list[float] | None = Field(None, description="(C,) classifier bias b (needs weights).")
    test_features: list[list[float]] | None = Field(None, description="(N', d) held-out features.")
    test_labels: list[Any] | None = Field(None, description="(N',) held-out labels.")
    options: MeasureOptions = Field(default_factory=MeasureOptions,
                                    description="The measure options as one object (or as top-level keys).")
    num_classes: NumClasses = None
    center: Center = "none"
    global_mean: GlobalMean = "class_mean"
    remap_labels: RemapLabels = False

    def merged_options(self) -> MeasureOptions:
        """``options`` with the top-level option keys that were sent laid over it."""
        top = {name: getattr(self, name) for name in OPTION_FIELDS if name in self.model_fields_set}
        return self.options.model_copy(update=top) if top else self.options


class MeasureMultipartForm(BaseModel):
    """``multipart/form-data`` parts of POST /measure (documentation only; the body is streamed to disk)."""

    features: bytes = Field(description=".npy/.npz/.safetensors/.pt (weights_only)/.json, (N, d)")
    labels: bytes = Field(description="(N,) integer class ids")
    weights: bytes | None = None
    bias: bytes | None = None
    test_features: bytes | None = None
    test_labels: bytes | None = None
    bundle: bytes | None = Field(None, description="instead of separate files: one .npz/.safetensors/.pt/.json "
                                                   "holding arrays named features, labels, weights, bias, ...")
    options: str | None = Field(None, description='JSON object of MeasureOptions, e.g. {"num_classes": 10}; '
                                                  'single fields of the same names override it')
    num_classes: NumClasses = None
    center: Center | None = None
    global_mean: GlobalMean | None = None
    remap_labels: RemapLabels | None = None


MEASURE_RESULT_EXAMPLE: dict[str, Any] = {
    "num_classes": 3, "num_samples": 6, "dim": 2, "class_counts": [2, 2, 2], "intra_cos_min": 0.99,
    "inter_cos_max": -0.49, "nc1": 0.004, "ncc_accuracy": 1.0, "classifier_accuracy": 1.0, "loss": 0.41,
    "alpha": 1.0, "beta": 1.0, "min_loss_m": 0.40, "epsilon": 0.01, "bounds": {"...": "Theorem 2.3.1 block"}}

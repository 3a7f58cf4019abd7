"""``json_safe``: results as plain JSON (python scalars and lists; ``None`` for NaN/inf, never NaN)."""

from __future__ import annotations

import math
from typing import Any


def json_safe(v: Any) -> Any:
    """Convert numpy/torch scalars and arrays (any device), tuples and nested dicts to plain JSON values.

    Non-finite floats become ``None``: strict JSON (PostgreSQL's JSON type and browsers reject NaN).
    """
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        f = float(v)
        return f if math.isfinite(f) else None
    if hasattr(v, "detach"):  # torch.Tensor
        v = v.detach().cpu()
    if hasattr(v, "tolist"):  # numpy / torch array or scalar
        return json_safe(v.tolist())
    return v

"""Configurable compute limits of one request (issue 7, "sweep specs that would explode").

``ncengine`` has hard caps (``ncengine.config.MAX_*``, ``ncengine.sweep.MAX_SWEEP_RUNS``) that no deployment
can lift. The service adds its own, tighter limits from :class:`ncservice.settings.Settings` (``NCS_MAX_SWEEP_RUNS``,
``NCS_MAX_EPOCHS``, ``NCS_MAX_WIDTH``, ``NCS_MAX_TOTAL_EPOCHS``, ``NCS_MAX_UFM_STEPS``): a request beyond them is
refused at once with 422 problem+json naming the field, instead of being queued and left to die in a worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from api.problems import ApiProblem


def _refuse(field: str, detail: str, limit: int, setting: str) -> ApiProblem:
    return ApiProblem(422, "limit-exceeded", detail, field=field, title="Request exceeds a service limit",
                      extra={"limit": limit, "setting": setting})


def _field(key: str, grid: Mapping[str, Any], prefix: str) -> str:
    """Where a value came from: ``grid.<key>`` when the grid sets it, else ``<prefix><key>``."""
    return f"grid.{key}" if key in grid else f"{prefix}{key}"


def check_run_count(n_runs: int, settings: Any, *, field: str = "grid") -> None:
    """Refuse a sweep of more than ``settings.max_sweep_runs`` runs (422 naming ``field``), before expanding it."""
    if n_runs > settings.max_sweep_runs:
        raise _refuse(field, f"the sweep expands to {n_runs} runs, more than the limit of "
                      f"{settings.max_sweep_runs}", settings.max_sweep_runs, "max_sweep_runs")


def check_runs(configs: Iterable[Any], settings: Any, *, grid: Mapping[str, Any] | None = None,
               prefix: str = "config.", count_field: str = "grid") -> None:
    """Refuse a set of training runs beyond the service's limits.

    Args:
        configs: ``ncengine.config.RunConfig`` objects (the expanded sweep, or the one run of a train job).
        settings: the service settings (``max_sweep_runs``, ``max_epochs``, ``max_width``, ``max_total_epochs``).
        grid: the sweep's grid (to name ``grid.<key>`` when the grid set the offending value).
        prefix: field prefix of a value the grid did not set (``base.`` for sweeps, ``config.`` for jobs).
        count_field: the field named when there are too many runs.

    Raises:
        ApiProblem: 422 ``limit-exceeded`` naming the field, with ``limit`` and ``setting`` in the body.
    """
    grid = grid or {}
    configs = list(configs)
    check_run_count(len(configs), settings, field=count_field)
    total = 0
    for cfg in configs:
        epochs = cfg.schedule.epochs
        if epochs > settings.max_epochs:
            raise _refuse(_field("schedule.epochs", grid, prefix), f"{epochs} epochs exceed the limit of "
                          f"{settings.max_epochs}", settings.max_epochs, "max_epochs")
        width = cfg.model.width
        if width > settings.max_width:
            raise _refuse(_field("model.width", grid, prefix), f"width {width} exceeds the limit of "
                          f"{settings.max_width}", settings.max_width, "max_width")
        total += epochs
    if total > settings.max_total_epochs:
        raise _refuse(count_field if len(configs) > 1 else _field("schedule.epochs", grid, prefix),
                      f"{len(configs)} runs x epochs = {total} run-epochs exceed the limit of "
                      f"{settings.max_total_epochs}", settings.max_total_epochs, "max_total_epochs")


def check_ufm(config: Any, settings: Any) -> None:
    """Refuse a ``ufm`` job with more gradient steps than ``settings.max_ufm_steps`` (422, ``config.steps``)."""
    if config.steps > settings.max_ufm_steps:
        raise _refuse("config.steps", f"{config.steps} steps exceed the limit of {settings.max_ufm_steps}",
                      settings.max_ufm_steps, "max_ufm_steps")

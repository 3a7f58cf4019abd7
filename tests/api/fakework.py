"""Play a worker's part through ``db.jobs`` (claim, progress, metric points, succeed) without Celery or torch.

The metric values are simple closed forms of the run's config, so tests can recompute what a figure, a CSV
row or an event must show.
"""

from __future__ import annotations

from typing import Any

from db import jobs as dbjobs

BN_INTRA = {"affine": 0.9, "non_affine": 0.7, "none": 0.5}


def final_metrics(run: dict[str, Any]) -> dict[str, Any]:
    """Final metrics of a fake run: intra cosine from the BN mode, inter cosine from the weight decay."""
    bn, wd = run["model"]["batch_norm"], run["optim"]["weight_decay"]
    return {"train_loss": 0.01, "train_accuracy": 1.0 if bn != "none" else 0.9, "intra_cos_min": BN_INTRA[bn],
            "inter_cos_max": -0.1 - wd, "nc1": wd, "ncc_accuracy": 1.0, "effective_depth": 2}


def point(epoch: int, layer: int, run: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A metric point at ``epoch``: the final metrics scaled by ``(epoch + 1) / epochs``."""
    f = (epoch + 1) / epochs
    fm = final_metrics(run)
    return {"epoch": epoch, "layer": layer,
            "metrics": {"train_loss": 1.0 - 0.99 * f, "train_accuracy": f * fm["train_accuracy"],
                        "intra_cos_min": f * fm["intra_cos_min"], "inter_cos_max": fm["inter_cos_max"],
                        "nc1": 1.0 / (epoch + 1), "ncc_accuracy": f}}


def run_job(sessionmaker, job_id: str, *, epochs: int | None = None, layers: list[int] = (-1,),
            finish: bool = True, worker: str = "w") -> list[dict[str, Any]]:
    """Claim ``job_id``, report every epoch with one point per run and layer, then succeed with final metrics.

    Returns the job's run configs.
    """
    with sessionmaker() as s:
        runs = dbjobs.get_job(s, job_id).config["runs"]
        epochs = epochs or int(runs[0]["schedule"]["epochs"])
        dbjobs.claim(s, job_id, worker=worker, lease_seconds=600)
        for e in range(epochs):
            dbjobs.report_progress(s, job_id, worker=worker, epoch=e + 1, total=epochs)
            dbjobs.add_metric_points(s, job_id, [{"run_index": k, **point(e, layer, run, epochs)}
                                                 for k, run in enumerate(runs) for layer in layers])
        if finish:
            dbjobs.succeed(s, job_id, worker=worker,
                           result={"runs": [{"config": run, "final": final_metrics(run)} for run in runs]})
    return runs

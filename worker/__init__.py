"""Celery workers: the app factory (:mod:`worker.celery_app`), thin tasks that claim a job, call ``ncengine``
and write through ``db.jobs`` (:mod:`worker.tasks`), and the reconciler (:mod:`worker.reconciler`).

Nothing here touches CUDA at import time (torch and ncengine are imported inside the task bodies).
"""

"""A small synchronous client of the NC service's HTTP API (httpx).

    >>> from ncservice.client import NCClient
    >>> with NCClient("http://127.0.0.1:8000") as nc:                      # doctest: +SKIP
    ...     sweep = nc.submit_sweep("thesis-fig3.1", scale="small")
    ...     nc.wait(sweep)                                               # progress bar until every job ends
    ...     frame = nc.results(sweep["id"])           # pandas.DataFrame, one row per run (json without pandas)
    ...     metrics = nc.measure(H, y, W, b)                               # NC metrics + bound block

Polling is cheap for the server: ``wait`` sends the job's ``ETag`` back in ``If-None-Match`` (a 304 costs no
body) and sleeps for the ``Retry-After`` the server asks for. Every non-2xx answer raises
:class:`NCServiceError` carrying the RFC 9457 problem+json body (``status``, ``title``, ``detail``, ``field``).
"""

from __future__ import annotations

import email.utils
import io
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import numpy as np

JOB_TERMINAL = frozenset({"succeeded", "failed", "canceled"})
SWEEP_TERMINAL = frozenset({"succeeded", "failed", "canceled"})


class NCServiceError(Exception):
    """The service answered with an error (or could not be reached: ``status`` is then ``None``).

    Attributes:
        status: HTTP status code (``None`` for a transport error).
        title: problem title (RFC 9457), e.g. "Invalid input".
        detail: human-readable explanation.
        field: dotted path of the input at fault (e.g. ``labels``, ``config.optim.lr``), if the server named one.
        type: problem type URI, e.g. ``urn:ncs:problem:input-error``.
        body: the whole problem+json body (or ``{"detail": <text>}`` when the body was not JSON).
    """

    def __init__(self, status: int | None, title: str | None, detail: str | None, *, field: str | None = None,
                 type: str | None = None, body: Mapping[str, Any] | None = None) -> None:  # noqa: A002
        self.status = status
        self.title = title
        self.detail = detail
        self.field = field
        self.type = type
        self.body = dict(body or {})
        where = f" [{field}]" if field else ""
        super().__init__(f"{status or 'no answer'} {title or ''}{where}: {detail or ''}".strip())

    @classmethod
    def from_response(cls, response: httpx.Response) -> NCServiceError:
        """Build from an error response, parsing problem+json (or plain JSON / text)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {"detail": response.text[:2000] or None}
        detail = body.get("detail")
        if detail is not None and not isinstance(detail, str):  # e.g. FastAPI's default {"detail": [...]}
            detail = json.dumps(detail)
        return cls(response.status_code, body.get("title") or response.reason_phrase, detail,
                   field=body.get("field"), type=body.get("type"), body=body)


def _to_numpy(value: Any, field: str) -> np.ndarray:
    """numpy/torch/list -> a numpy array that ``np.save(allow_pickle=False)`` accepts."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            t = t.float()
        value = t.numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise TypeError(f"{field}: not a numeric array (dtype object)")
    return arr


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), else None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class NCClient:
    """Synchronous client of the NC service.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` (no trailing path needed).
        api_key: sent as ``Authorization: Bearer <key>`` when given.
        timeout: per-request timeout in seconds.
        poll_interval: seconds between polls when the server sends no ``Retry-After``.
        max_poll_interval: upper bound on any wait between polls (also on a large ``Retry-After``).
        transport: an ``httpx`` transport (tests: ``httpx.MockTransport``).
        sleep: the sleep function used between polls (tests inject a fake clock).
        http_client: an ``httpx.Client`` to use as is (e.g. FastAPI's ``TestClient`` of an in-process app);
            then ``base_url``, ``timeout`` and ``transport`` are not used to build one.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0, *,
                 poll_interval: float = 1.0, max_poll_interval: float = 30.0,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep,
                 http_client: httpx.Client | None = None) -> None:
        headers = {"Accept": "application/json, application/problem+json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self._sleep = sleep
        self._owns_http = http_client is None  # a client passed in is the caller's to close
        if http_client is not None:
            http_client.headers.update(headers)
            self._http = http_client
        else:
            self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    # ------------------------------------------------------------------------------------------ plumbing
    def close(self) -> None:
        """Close the HTTP client this object made (an ``http_client`` passed in stays open)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> NCClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """Send a request; any status >= 400 not in ``ok`` raises :class:`NCServiceError`."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise NCServiceError(None, "Service unreachable", f"{method} {self.base_url}{path}: {exc}") from exc
        if response.status_code >= 400 and response.status_code not in ok:
            raise NCServiceError.from_response(response)
        return response

    # ------------------------------------------------------------------------------------------ resources
    def submit_sweep(self, spec_or_preset: str | Mapping[str, Any], scale: str | None = None, *,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """``POST /sweeps``.

        Args:
            spec_or_preset: a preset name (``"thesis-fig3.1"``, ``"thesis-fig3.3"``) or a full body (a
                ``SweepSpec`` dict: ``base``, ``grid``, ``seeds``; or ``{"preset": ..., "scale": ...}``).
            scale: ``"small"`` or ``"full"`` for a preset (default: the server's, ``small``).
            idempotency_key: sent as ``Idempotency-Key`` (a retried POST returns the same sweep).

        Returns:
            The 202 body: ``{id, location, runs, jobs: [{id, kind, status, location}]}``.
        """
        if isinstance(spec_or_preset, str):
            body: dict[str, Any] = {"preset": spec_or_preset}
        else:
            body = dict(spec_or_preset)
        if scale is not None:
            body["scale"] = scale
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._request("POST", "/sweeps", json=body, headers=headers).json()

    def submit_job(self, kind: str, config: Mapping[str, Any], *, idempotency_key: str | None = None
                   ) -> dict[str, Any]:
        """``POST /jobs`` with ``{"kind": kind, "config": config}``; returns the 202 body."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._request("POST", "/jobs", json={"kind": kind, "config": dict(config)}, headers=headers).json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{id}``: status, progress, latest and final metrics, bounds, error."""
        return self._request("GET", f"/jobs/{job_id}").json()

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        """``GET /sweeps/{id}``: the sweep's jobs, their states and the overall progress."""
        return self._request("GET", f"/sweeps/{sweep_id}").json()

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """``POST /jobs/{id}/cancel``: a waiting job is canceled at once, a running one goes to ``cancelling``
        (its worker stops at the next epoch). Idempotent. Returns the job summary (``status``).

        Raises:
            NCServiceError: 404 unknown job (or another key's); 409 the job already succeeded or failed.
        """
        return self._request("POST", f"/jobs/{job_id}/cancel").json()

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        """``POST /sweeps/{id}/cancel``: cancel every job of the sweep that has not ended (waiting ones at
        once, running ones go to ``cancelling``). Idempotent; jobs that already ended are left as they are.

        Returns:
            The sweep as :meth:`get_sweep` returns it, after the cancel (:meth:`wait` for ``cancelling``
            jobs to stop).

        Raises:
            NCServiceError: 404 unknown sweep (or another key's).
        """
        return self._request("POST", f"/sweeps/{sweep_id}/cancel").json()

    def results(self, sweep_id: str, format: str | None = None) -> Any:  # noqa: A002
        """``GET /sweeps/{id}/results``: one row per run (config as dotted keys + final metrics).

        Args:
            sweep_id: the sweep.
            format: ``"dataframe"`` (a ``pandas.DataFrame``, one row per run, the server's column order),
                ``"json"`` (``{sweep_id, columns, rows}``) or ``"csv"`` (the CSV text). Default: a DataFrame
                when pandas is installed, else the json dict.

        Raises:
            ValueError: unknown ``format``. ImportError: ``"dataframe"`` without pandas.
        """
        if format is None:
            try:
                import pandas  # noqa: F401
                format = "dataframe"
            except ImportError:
                format = "json"
        if format not in ("json", "csv", "dataframe"):
            raise ValueError(f"format: {format!r}, expected 'dataframe', 'json' or 'csv'")
        wire = "csv" if format == "csv" else "json"
        response = self._request("GET", f"/sweeps/{sweep_id}/results", params={"format": wire})
        if format == "csv":
            return response.text
        data = response.json()
        if format == "json":
            return data
        import pandas as pd

        return pd.DataFrame(data["rows"], columns=data.get("columns") or None)

    def job_metrics(self, job_id: str, *, run_index: int | None = None, layer: int | None = None,
                    page_size: int = 500) -> list[dict[str, Any]]:
        """``GET /jobs/{id}/metrics``, every page: points ``{run_index, epoch, layer, metrics}`` in order."""
        params: dict[str, Any] = {"limit": page_size}
        if run_index is not None:
            params["run_index"] = run_index
        if layer is not None:
            params["layer"] = layer
        items: list[dict[str, Any]] = []
        while True:
            page = self._request("GET", f"/jobs/{job_id}/metrics", params=params).json()
            items.extend(page.get("items") or [])
            cursor = page.get("next_cursor")
            if not cursor:
                return items
            params["cursor"] = cursor

    def measure(self, features: Any, labels: Any, weights: Any = None, bias: Any = None, *,
                test_features: Any = None, test_labels: Any = None, run_async: bool = False, wait: bool = True,
                **options: Any) -> dict[str, Any]:
        """``POST /measure`` with the arrays as ``.npy`` multipart files (``allow_pickle=False``).

        Args:
            features: (N, d) numpy array or torch tensor (any float dtype; bfloat16 is sent as float32).
            labels: (N,) integer class ids.
            weights, bias: optional classifier ``W`` (C, d) and ``b`` (C,).
            test_features, test_labels: optional held-out split.
            run_async: ask for a job even when small (``?async=true``).
            wait: when the server queued a job (202), wait for it and return its result.
            **options: measure options (``num_classes``, ``center``, ``global_mean``, ``remap_labels``, ...),
                sent as the ``options`` JSON part.

        Returns:
            The metrics dict (``ncengine.metrics.measure(...).to_dict()``, with ``bounds`` when ``weights``
            is given); with ``wait=False`` and a queued job, the 202 body ``{id, kind, status, location}``.

        Raises:
            NCServiceError: the server refused the input (``field`` names it) or the measure job failed.
            TypeError: an array that is not numeric.
        """
        arrays = {"features": features, "labels": labels, "weights": weights, "bias": bias,
                  "test_features": test_features, "test_labels": test_labels}
        files = {name: (f"{name}.npy", _npy(_to_numpy(value, name)), "application/octet-stream")
                 for name, value in arrays.items() if value is not None}
        data = {"options": json.dumps(options)} if options else None
        params = {"async": "true"} if run_async else None
        response = self._request("POST", "/measure", files=files, data=data, params=params)
        body = response.json()
        if response.status_code != 202 or not wait:
            return body
        job = self.wait(body, progress=False)
        if job.get("status") != "succeeded":
            err = job.get("error") or {}
            raise NCServiceError(None, f"measure job {job.get('status')}", err.get("message"),
                                 type=err.get("code"), body=job)
        return job.get("final") or {}

    # ------------------------------------------------------------------------------------------- waiting
    def _resolve(self, target: str | Mapping[str, Any]) -> tuple[str, str, httpx.Response | None]:
        """``(kind, id, first response or None)``, kind ``job`` or ``sweep``, for an id or a 202 body / resource
        dict. A bare id is tried as a job, then as a sweep; the answer found serves as the first poll."""
        if isinstance(target, Mapping):
            location = str(target.get("location") or (target.get("links") or {}).get("self") or "")
            ident = str(target.get("id") or location.rstrip("/").rsplit("/", 1)[-1])
            if location.startswith("/sweeps/") or ("runs" in target and "jobs" in target):
                return "sweep", ident, None
            return "job", ident, None
        response = self._request("GET", f"/jobs/{target}", ok=(404,))
        if response.status_code != 404:
            return "job", str(target), response
        return "sweep", str(target), self._request("GET", f"/sweeps/{target}")  # raises 404 if neither

    def wait(self, job_or_sweep_id: str | Mapping[str, Any], progress: bool = True, *,
             timeout: float | None = None) -> dict[str, Any]:
        """Poll a job or a sweep until it ends; return its last body.

        Honours ``Retry-After`` (capped by ``max_poll_interval``) and ``ETag``: a job's ETag is sent back in
        ``If-None-Match`` and a 304 reuses the previous body. With ``progress`` a rich progress bar shows
        epochs done over epochs planned.

        Args:
            job_or_sweep_id: an id (a job id is tried first, then a sweep id) or the 202 body of a submit.
            progress: draw a progress bar on the terminal (stderr).
            timeout: seconds before giving up (``TimeoutError``); ``None`` waits for ever.

        Returns:
            The final ``GET /jobs/{id}`` or ``GET /sweeps/{id}`` body (status ``succeeded``, ``failed`` or
            ``canceled``). A failed job is returned, not raised: check ``status``.
        """
        kind, ident, first = self._resolve(job_or_sweep_id)
        path = f"/{kind}s/{ident}"
        terminal = JOB_TERMINAL if kind == "job" else SWEEP_TERMINAL
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = task = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("epochs"), TimeElapsedColumn(), transient=False)
            bar.start()
            task = bar.add_task(f"{kind} {ident[:8]}", total=None)
        body: dict[str, Any] | None = None
        etag: str | None = None
        try:
            while True:
                if first is not None:
                    response, first = first, None
                else:
                    headers = {"If-None-Match": etag} if etag and body is not None else None
                    response = self._request("GET", path, headers=headers)
                if response.status_code != 304:
                    body = response.json()
                    etag = response.headers.get("ETag")
                if body is None:  # a 304 without If-None-Match sent: the server is broken
                    raise NCServiceError(304, "Not Modified", f"GET {path} answered 304 to a request without ETag")
                status = body.get("status")
                if bar is not None:
                    prog = body.get("progress") or {}
                    bar.update(task, total=prog.get("total") or None, completed=prog.get("epoch") or 0,
                               description=f"{kind} {ident[:8]} {status}")
                if status in terminal:
                    return body
                delay = _retry_after(response)
                delay = self.poll_interval if delay is None else delay
                delay = min(delay, self.max_poll_interval)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{kind} {ident} still {status} after {timeout} s")
                    delay = min(delay, left)
                self._sleep(delay)
        finally:
            if bar is not None:
                bar.stop()

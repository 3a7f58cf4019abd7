"""``POST /measure``: NC metrics and the Theorem 2.3.1 bound of uploaded features.

Two body forms: ``multipart/form-data`` (files ``features``, ``labels``, optional ``weights``, ``bias``,
``test_features``, ``test_labels`` as ``.npy/.npz/.safetensors/.pt/.json``, plus an ``options`` JSON field),
streamed to disk and opened with ``ncengine.io.load_array`` (``.npy`` memory-mapped); or ``application/json``
(``MeasureRequest``, read with the body-size limit, then parsed, validated and converted in a worker thread: a
large JSON body never holds up the event loop). The options (``MeasureOptions``) come as the ``options`` JSON
part/object or as single form fields / top-level JSON keys of the same names. When
``N*d <= settings.measure_sync_max_elements`` and not ``?async=true``, the metrics are computed in a worker
thread and returned (200); otherwise the inputs are kept on disk and a ``measure`` job is queued (202 +
``Location: /jobs/{id}``); the job's ``config.inputs`` names each file relative to ``settings.upload_dir``
(``<upload id>/<field>.npy``), so no server path shows in ``GET /jobs/{id}``.
"""

from __future__ import annotations

import json
import shutil
import uuid
import zipfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.deps import IdempotencyKeyDep, OwnerDep, QueueDep, SessionDep, SettingsDep, request_hash
from api.problems import ApiProblem, problem_responses, validation_errors
from api.routers.jobs import accepted, enqueue_committed
from api.schemas.jobs import JobAccepted
from api.schemas.measure import (ARRAY_FIELDS, MEASURE_RESULT_EXAMPLE, OPTION_FIELDS, MeasureMultipartForm,
                                 MeasureOptions, MeasureRequest)
from api.uploads import ParsedForm, read_body_limited, stream_multipart
from db import jobs as dbjobs
from ncengine.errors import InputError

router = APIRouter(tags=["measure"])

#: how to pass an option over HTTP, appended to ncengine's messages that name it as a Python keyword
HTTP_OPTION_HINT = ("(HTTP: the form field or JSON key remap_labels=true, or \"remap_labels\": true in the "
                    "options object)")


def _openapi_extra() -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": MeasureMultipartForm.model_json_schema()},
        "application/json": {"schema": MeasureRequest.model_json_schema(),
                             "example": MeasureRequest.model_config["json_schema_extra"]["examples"][0]}}}}


def _options(raw: dict[str, Any], prefix: str = "options") -> MeasureOptions:
    try:
        return MeasureOptions.model_validate(raw)
    except ValidationError as exc:
        errors = validation_errors(exc.errors(include_url=False), prefix=prefix)
        raise ApiProblem(422, "validation-error", "; ".join(f"{e['field']}: {e['message']}" for e in errors),
                         field=errors[0]["field"], title="Request validation failed",
                         extra={"errors": errors}) from None


def _form_options(form: ParsedForm) -> MeasureOptions:
    """Options from the ``options`` JSON part, overridden by single parts named like an option."""
    raw: dict[str, Any] = {}
    if "options" in form.fields and form.fields["options"].strip():
        try:
            raw = json.loads(form.fields["options"])
        except json.JSONDecodeError as exc:
            raise ApiProblem(422, "validation-error", f"options: not valid JSON ({exc.msg})",
                             field="options") from None
        if not isinstance(raw, dict):
            raise ApiProblem(422, "validation-error", "options: expected a JSON object", field="options")
    for name in OPTION_FIELDS:
        if name in form.fields:
            raw[name] = form.fields[name]
    return _options(raw)


#: decoded arrays may be larger than their upload (JSON text -> float64, compressed .npz); beyond this factor
#: times ``settings.max_upload_bytes`` an array is refused from its header, before anything is decompressed
DECODED_BYTES_FACTOR = 4


def _unreadable(field: str, path: Path, exc: Exception) -> InputError:
    return InputError(field, f"could not read the uploaded {path.suffix} file ({type(exc).__name__})",
                      expected="a well-formed .npy, .npz, .safetensors, .pt (weights_only) or .json file")


def _load(path: Path, field: str, max_bytes: int) -> Any:
    """``ncengine.io.load_array`` on an upload; whatever else a malformed untrusted file raises is the upload's
    fault too, so it becomes an InputError naming the field (422), never a 500."""
    from ncengine.io import load_array

    try:
        return load_array(path, field=field, max_bytes=max_bytes)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - parser errors of an untrusted file
        raise _unreadable(field, path, exc) from exc


def _load_bundle(path: Path, max_bytes: int) -> dict[str, Any]:
    from ncengine.io import load_bundle

    try:
        return load_bundle(path, field="bundle", max_bytes=max_bytes)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - parser errors of an untrusted file
        raise _unreadable("bundle", path, exc) from exc


def _shape_checks(arrays: dict[str, Any]) -> tuple[int, int]:
    """Cheap shape checks (no data pass) so a queued job does not fail on what is visible at once.

    Returns:
        ``(N, d)`` of the features.
    """
    f = arrays["features"]
    if getattr(f, "ndim", None) != 2:
        raise InputError("features", f"got shape {getattr(f, 'shape', None)}", expected="(N, d)")
    n, d = int(f.shape[0]), int(f.shape[1])
    lab = arrays["labels"]
    if getattr(lab, "ndim", None) != 1:
        raise InputError("labels", f"got shape {getattr(lab, 'shape', None)} (one-hot labels are refused)",
                         expected="(N,) integer class ids")
    if lab.shape[0] != n:
        raise InputError("labels", f"{lab.shape[0]} labels for {n} feature rows", expected=f"({n},)")
    w = arrays.get("weights")
    if w is not None and (getattr(w, "ndim", None) != 2 or w.shape[1] != d):
        raise InputError("weights", f"got shape {getattr(w, 'shape', None)}", expected=f"(C, {d})")
    b = arrays.get("bias")
    if b is not None:
        if w is None:
            raise InputError("bias", "given without weights", expected="weights (C, d) together with bias (C,)")
        if getattr(b, "ndim", None) != 1 or b.shape[0] != w.shape[0]:
            raise InputError("bias", f"got shape {getattr(b, 'shape', None)}", expected=f"({w.shape[0]},)")
    tf, tl = arrays.get("test_features"), arrays.get("test_labels")
    if (tf is None) != (tl is None):
        raise InputError("test_labels" if tl is None else "test_features",
                         "the held-out split needs both test_features and test_labels", expected="both or neither")
    if tf is not None:
        if getattr(tf, "ndim", None) != 2 or tf.shape[1] != d:
            raise InputError("test_features", f"got shape {getattr(tf, 'shape', None)}", expected=f"(N', {d})")
        if getattr(tl, "ndim", None) != 1 or tl.shape[0] != tf.shape[0]:
            raise InputError("test_labels", f"got shape {getattr(tl, 'shape', None)}",
                             expected=f"({tf.shape[0]},)")
    return n, d


def _measure(arrays: dict[str, Any], options: MeasureOptions) -> dict[str, Any]:
    from ncengine.metrics import measure

    return measure(arrays["features"], arrays["labels"], arrays.get("weights"), arrays.get("bias"),
                   test_features=arrays.get("test_features"), test_labels=arrays.get("test_labels"),
                   **options.model_dump()).to_dict()


def _json_arrays(req: MeasureRequest) -> dict[str, Any]:
    """Nested lists -> numpy (float64 features/weights; labels as given, validated by ``measure``)."""
    out: dict[str, Any] = {}
    for name in ARRAY_FIELDS:
        value = getattr(req, name)
        if value is None:
            continue
        try:
            out[name] = np.asarray(value, dtype=np.float64 if name in ("features", "weights", "bias",
                                                                       "test_features") else None)
        except (ValueError, TypeError) as exc:
            raise InputError(name, f"not a rectangular numeric array ({exc})",
                             expected="rows of equal length" if name != "labels" else "(N,) integers") from None
        if out[name].dtype == object:
            raise InputError(name, "not a rectangular array", expected="(N,) integer class ids")
    return out


def _parse_json(raw: bytes) -> tuple[MeasureOptions, dict[str, Any]]:
    """Parse + validate + convert a JSON body (run in a worker thread: tens of MB of JSON take a second).

    Raises:
        ValidationError: not JSON (-> 400) or not a ``MeasureRequest`` (-> 422 naming the field).
        InputError: an array that is not rectangular/numeric (-> 422 naming it).
    """
    # one pass of pydantic-core over the bytes: no json.loads/json.dumps of the whole body (each holds the GIL,
    # so every thread, the event loop's too, waits for it; the request hash uses the saved files' digests)
    req = MeasureRequest.model_validate_json(raw)
    return req.merged_options(), _json_arrays(req)


def _bundle_members(path: Path) -> list[str]:
    """Array names in a ``.npz``/``.safetensors`` upload, read from its index/header only ([] if none)."""
    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as zf:
                return [n.removesuffix(".npy") for n in zf.namelist()]
        if path.suffix == ".safetensors":
            from ncengine.io import DEFAULT_MAX_HEADER_BYTES, _safetensors_header

            header, _ = _safetensors_header(path, "features", DEFAULT_MAX_HEADER_BYTES)
            return list(header)
    except Exception:  # noqa: BLE001 - only a hint: the real load reports what is wrong with the file
        return []
    return []


def _missing_part(required: str, form: ParsedForm) -> ApiProblem:
    """422 for a missing ``features``/``labels`` part; says to use ``bundle`` when the other part is one."""
    detail = f"the file part {required!r} is required"
    other = form.files.get("labels" if required == "features" else "features")
    members = _bundle_members(other.path) if other is not None else []
    if len(members) > 1:
        detail += (f"; the {other.field!r} file {other.filename!r} holds several arrays {sorted(members)[:10]}: "
                   f"send one .npz/.safetensors with features and labels as the `bundle` part "
                   f"(e.g. -F bundle=@{other.filename})")
    return ApiProblem(422, "missing-field", detail, field=required)


def _with_http_hint(exc: InputError) -> InputError | ApiProblem:
    """ncengine's "pass remap_labels=True" (a Python keyword) plus how to send it over HTTP."""
    if "remap_labels=True" not in str(exc):
        return exc
    extra = {"expected": exc.expected} if exc.expected else None
    return ApiProblem(422, "input-error", f"{exc} {HTTP_OPTION_HINT}", field=exc.field, title="Invalid input",
                      extra=extra)


def _query_options(request: Request) -> None:
    """An option given in the query string would be silently ignored: refuse it, saying where it goes."""
    for name in OPTION_FIELDS:
        if name in request.query_params:
            raise ApiProblem(422, "validation-error", f"{name} is not a query parameter: send it in the body, as "
                             f"the form field or JSON key {name} (or in the options object)",
                             field=f"query.{name}", title="Request validation failed")


def _queue_job(session: Any, queue: Any, settings: Any, *, inputs: dict[str, str | None],
               options: MeasureOptions, owner: str | None, idempotency_key: str | None, req_hash: str,
               files: list[tuple[str, Path, int, str]], dest: Path) -> JSONResponse:
    """Create + enqueue a ``measure`` job over files already under ``dest``; record them as artifacts."""
    job = dbjobs.create_job(session, kind="measure", config={"inputs": inputs, "options": options.model_dump()},
                            owner=owner, idempotency_key=idempotency_key,
                            request_hash=req_hash if idempotency_key else None)
    feats = (job.config.get("inputs") or {}).get("features") or ""
    if not str(feats).startswith(f"{dest.name}/"):  # an Idempotency-Key replay: the first request's files serve
        shutil.rmtree(dest, ignore_errors=True)
    else:
        for name, path, size, sha in files:
            dbjobs.create_artifact(session, kind="upload", name=path.name, path=str(path), bytes=size, sha256=sha,
                                   owner=owner, job_id=job.id)
    enqueue_committed(session, queue, job)
    return accepted(job, settings)


@router.post("/measure", summary="NC metrics + bound of uploaded features (sync when small, else a job)",
             openapi_extra=_openapi_extra(),
             responses={200: {"description": "The metrics (ncengine.metrics.measure(...).to_dict())",
                              "content": {"application/json": {"example": MEASURE_RESULT_EXAMPLE}}},
                        202: {"description": "Queued as a measure job; poll Location", "model": JobAccepted},
                        **problem_responses(400, 413, 415, 422)})
async def post_measure(request: Request, session: SessionDep, settings: SettingsDep, queue: QueueDep,
                       owner: OwnerDep, idempotency_key: IdempotencyKeyDep,
                       run_async: Annotated[bool, Query(alias="async", description="Always queue a job.")] = False,
                       ) -> JSONResponse:
    """Measure every NC metric of docs/metrics.md (and, with ``weights``, the loss, ``alpha``, ``beta``,
    ``min_loss_m``, ``epsilon`` and the Theorem 2.3.1 ``bounds`` block). Errors name the field at fault.

    Options (``num_classes``, ``center``, ``global_mean``, ``remap_labels``) go in the ``options`` object/part
    or as top-level JSON keys / single form fields of the same names (which override ``options``)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    _query_options(request)
    dest = settings.upload_dir / uuid.uuid4().hex
    keep = False
    try:
        if ctype == "multipart/form-data":
            form = await stream_multipart(request, dest, max_bytes=settings.max_upload_bytes,
                                          allowed_files={*ARRAY_FIELDS, "bundle"},
                                          allowed_fields={"options", *OPTION_FIELDS})
            options = _form_options(form)
            decoded_limit = DECODED_BYTES_FACTOR * settings.max_upload_bytes
            arrays: dict[str, Any] = {}
            sources: dict[str, Path] = {}
            if "bundle" in form.files:
                if len(form.files) > 1:
                    raise ApiProblem(422, "validation-error", "send either one 'bundle' file or separate files, "
                                     "not both", field="bundle")
                path = form.files["bundle"].path
                arrays = await run_in_threadpool(_load_bundle, path, decoded_limit)
                sources = {name: path for name in arrays}
            else:
                for required in ("features", "labels"):
                    if required not in form.files:
                        raise await run_in_threadpool(_missing_part, required, form)
                for name, saved in form.files.items():
                    arrays[name] = await run_in_threadpool(_load, saved.path, name, decoded_limit)
                    sources[name] = saved.path
            files = [(s.field, s.path, s.bytes, s.sha256) for s in form.files.values()]
        elif ctype in ("application/json", "") or ctype.endswith("+json"):
            raw = await read_body_limited(request, settings.max_json_bytes)
            # ValidationError -> 422 naming the field (400 if not JSON); InputError -> 422
            options, arrays = await run_in_threadpool(_parse_json, raw)
            del raw
            files = []
            sources = {}
        else:
            raise ApiProblem(415, "unsupported-media-type",
                             f"Content-Type {ctype!r} is not accepted; send multipart/form-data or application/json",
                             field="Content-Type")
        elements = int(np.prod(getattr(arrays["features"], "shape", (0,))))
        if not run_async and elements <= settings.measure_sync_max_elements:
            # measure() validates everything itself (its InputError names the field -> 422)
            result = await run_in_threadpool(_measure, arrays, options)
            return JSONResponse(result)
        # queued: refuse at once what the shapes already show, then the worker reads the inputs from disk
        _shape_checks(arrays)
        if not files:
            files = await run_in_threadpool(_save_arrays, arrays, dest)
            sources = {name: path for name, path, _, _ in files}
        # the files' digests (a JSON body's arrays as saved): an Idempotency-Key replay must match them
        req_hash = request_hash({"files": {name: sha for name, _, _, sha in files},
                                 "options": options.model_dump()})
        # names relative to settings.upload_dir (the worker resolves them): no server path in GET /jobs/{id}
        inputs: dict[str, str | None] = {name: None for name in ARRAY_FIELDS}
        inputs.update({name: path.relative_to(settings.upload_dir).as_posix() for name, path in sources.items()})
        response = await run_in_threadpool(
            lambda: _queue_job(session, queue, settings, inputs=inputs, options=options, owner=owner,
                               idempotency_key=idempotency_key, req_hash=req_hash, files=files, dest=dest))
        keep = True
        return response
    except InputError as exc:
        raise _with_http_hint(exc) from exc
    finally:
        if not keep:
            shutil.rmtree(dest, ignore_errors=True)


def _save_arrays(arrays: dict[str, Any], dest: Path) -> list[tuple[str, Path, int, str]]:
    """Save the (JSON) arrays as ``<dest>/<name>.npy``: ``[(name, path, bytes, sha256)]``."""
    dest.mkdir(parents=True, exist_ok=False)
    out = []
    for name, arr in arrays.items():
        path = dest / f"{name}.npy"
        np.save(path, arr, allow_pickle=False)
        out.append((name, path, path.stat().st_size, _sha256(path)))
    return out


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

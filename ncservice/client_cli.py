"""Client commands of ``ncservice``: ``submit``, ``status``, ``watch``, ``cancel``, ``results`` (over HTTP,
:class:`NCClient`).

Every command takes ``--url`` (env ``NCS_URL``) and ``--api-key`` (env ``NCS_API_KEY``). Errors of the service
(problem+json) are printed as ``error: <status> <title> [field]: <detail>`` and exit with code 2.

Tests (and notebooks driving the CLI) may pass ``obj={"client_factory": f}`` to typer's ``CliRunner.invoke``:
``f(url, api_key)`` then builds the client (e.g. an :class:`NCClient` over FastAPI's ``TestClient``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer

from ncservice.client import JOB_TERMINAL, NCClient, NCServiceError

URL_OPTION = typer.Option("http://127.0.0.1:8000", "--url", envvar="NCS_URL", help="the running service")
KEY_OPTION = typer.Option(None, "--api-key", envvar="NCS_API_KEY", help="sent as a Bearer token")


def example(*lines: str) -> str:
    """A typer ``epilog`` showing example invocations (rendered verbatim by ``--help``)."""
    body = "\n\n".join(f"  $ {line}" for line in lines)
    return f"Example:\n\n{body}"


def make_client(ctx: typer.Context, url: str, api_key: str | None) -> NCClient:
    """The client for ``url``: ``ctx.obj["client_factory"](url, api_key)`` when given, else :class:`NCClient`."""
    factory: Callable[[str, str | None], NCClient] | None = (ctx.obj or {}).get("client_factory") \
        if isinstance(ctx.obj, Mapping) else None
    return factory(url, api_key) if factory else NCClient(url, api_key=api_key)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def load_spec(path: Path) -> dict[str, Any]:
    """Read a YAML (or JSON) sweep/job spec file into a dict; ValueError names what is wrong."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"SPEC {path}: not a YAML/JSON text file ({exc})") from exc
    except OSError as exc:
        raise ValueError(f"SPEC {path}: cannot read the spec: {exc.strerror or exc}") from exc
    if "\x00" in text:  # UTF-8-decodable binary (e.g. a .npz of ASCII bytes): not a spec either
        raise ValueError(f"SPEC {path}: not a YAML/JSON text file (it holds NUL bytes)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"SPEC {path}: cannot read the spec: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"SPEC {path}: a spec is a mapping (base/grid/seeds, preset/scale, or kind/config)")
    return data


def _progress_text(body: Mapping[str, Any]) -> str:
    prog = body.get("progress") or {}
    if prog.get("total"):
        return f"{prog.get('epoch') or 0}/{prog['total']} epochs"
    return "-"


def _kind_of(client: NCClient, ident: str) -> tuple[str, dict[str, Any]]:
    """``("job", body)`` or ``("sweep", body)`` for an id (tried as a job first)."""
    try:
        return "job", client.get_job(ident)
    except NCServiceError as exc:
        if exc.status != 404:
            raise
    return "sweep", client.get_sweep(ident)


def _is_job(client: NCClient, ident: str) -> bool:
    """Whether ``ident`` is a job id (``GET /jobs/{id}`` answers); any error is "no"."""
    try:
        client.get_job(ident)
    except NCServiceError:
        return False
    return True


def _current_status(client: NCClient, kind: str, accepted: Mapping[str, Any]) -> str:
    """The status to print after a submit: the answer's own ``status`` (a job's, current also when an
    ``Idempotency-Key`` replayed an earlier submit), else (a sweep's 202 carries none) ``GET /sweeps/{id}``'s;
    ``submitted`` if that GET fails."""
    if accepted.get("status"):
        return str(accepted["status"])
    try:
        body = client.get_job(accepted["id"]) if kind == "job" else client.get_sweep(accepted["id"])
    except NCServiceError:
        return "submitted"
    return str(body.get("status") or "submitted")


def register(app: typer.Typer) -> None:
    """Add ``submit``, ``status``, ``watch``, ``cancel`` and ``results`` to the ``ncservice`` typer app."""

    @app.command(epilog=example("ncservice submit --preset thesis-fig3.1 --scale small",
                                "ncservice submit sweep.yaml --watch",
                                "cat sweep.yaml   # base: {model: {depth: 6}}, grid: {optim.weight_decay: "
                                "[1e-4, 1e-3]}, seeds: [0, 1]"))
    def submit(ctx: typer.Context,
               spec: Path = typer.Argument(None, exists=True, dir_okay=False,
                                           help="YAML spec: a sweep (base, grid, seeds | preset, scale) or a "
                                                "job (kind: train|ufm, config)"),
               preset: str = typer.Option(None, "--preset", help="thesis-fig3.1 | thesis-fig3.3"),
               scale: str = typer.Option(None, "--scale", help="small | full (a preset's size)"),
               idempotency_key: str = typer.Option(None, "--idempotency-key", help="retry-safe submission"),
               watch_after: bool = typer.Option(False, "--watch", help="then watch it until it ends"),
               url: str = URL_OPTION, api_key: str = KEY_OPTION) -> None:
        """Submit a sweep (SPEC.yaml or --preset) or a single job (a SPEC with ``kind``); print its id."""
        if (spec is None) == (preset is None):
            raise _fail(ValueError("give either SPEC.yaml or --preset NAME"))
        try:
            body = load_spec(spec) if spec is not None else None  # before connecting: a bad file sends nothing
        except ValueError as exc:
            raise _fail(exc) from exc
        try:
            with make_client(ctx, url, api_key) as client:
                if body is None:
                    out = client.submit_sweep(preset, scale=scale, idempotency_key=idempotency_key)
                else:
                    if "kind" in body:
                        out = client.submit_job(body["kind"], body.get("config") or {},
                                                idempotency_key=idempotency_key)
                    else:
                        out = client.submit_sweep({**body, **({"scale": scale} if scale else {})},
                                                  idempotency_key=idempotency_key)
                kind = "sweep" if "jobs" in out else "job"
                extra = f": {out.get('runs')} runs in {len(out['jobs'])} job(s)" if kind == "sweep" else ""
                typer.echo(f"{kind} {out['id']} {_current_status(client, kind, out)}{extra}", err=True)
                typer.echo(out["id"])  # stdout: the id alone, for scripts (ID=$(ncservice submit ...))
                if watch_after:
                    _watch(client, out["id"], interval=None)
        except (NCServiceError, ValueError, TimeoutError) as exc:
            raise _fail(exc) from exc

    @app.command(epilog=example("ncservice status 3f2a...  # a job or a sweep id",
                                "ncservice status 3f2a... --json | jq .status"))
    def status(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID", help="a job or sweep id"),
               as_json: bool = typer.Option(False, "--json", help="print the full resource as JSON"),
               url: str = URL_OPTION, api_key: str = KEY_OPTION) -> None:
        """Show a job's or a sweep's state and progress (one line per job of a sweep)."""
        try:
            with make_client(ctx, url, api_key) as client:
                kind, body = _kind_of(client, ident)
        except NCServiceError as exc:
            raise _fail(exc) from exc
        if as_json:
            typer.echo(json.dumps(body, indent=1))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("job", "kind", "status", "progress", "attempts",
                      title=f"{kind} {body['id']}: {body['status']}" + (
                          f" ({body.get('name')}, {body.get('runs')} runs)" if kind == "sweep" else ""))
        for job in (body.get("jobs") or []) if kind == "sweep" else [body]:
            table.add_row(job["id"], job.get("kind", ""), job["status"], _progress_text(job),
                          str(job.get("attempts", "")))
        Console(width=140).print(table)
        if kind == "job" and body.get("error"):
            typer.echo(f"error: {body['error']}")

    @app.command(epilog=example("ncservice watch 3f2a...", "ncservice watch 3f2a... --interval 5"))
    def watch(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID", help="a job or sweep id"),
              interval: float = typer.Option(None, "--interval", help="seconds between polls (default: the "
                                             "server's Retry-After)"),
              url: str = URL_OPTION, api_key: str = KEY_OPTION) -> None:
        """Live progress bars (one per job) until the job or every job of the sweep has ended.

        Exit code 0 when it succeeded, 1 when it failed or was canceled."""
        try:
            with make_client(ctx, url, api_key) as client:
                final = _watch(client, ident, interval=interval)
        except (NCServiceError, TimeoutError) as exc:
            raise _fail(exc) from exc
        if final != "succeeded":
            raise typer.Exit(1)

    @app.command(epilog=example("ncservice cancel 3f2a...  # a job or a sweep id (every job of the sweep)",
                                "ncservice cancel 3f2a... --json | jq .status"))
    def cancel(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID", help="a job or sweep id"),
               as_json: bool = typer.Option(False, "--json", help="print the job or sweep after it as JSON"),
               url: str = URL_OPTION, api_key: str = KEY_OPTION) -> None:
        """Cancel a job, or every job of a sweep that has not ended: waiting jobs at once, running ones at
        their next epoch (``cancelling``). Canceling again is harmless; a job that already ended is an error
        (exit 2), a sweep's ended jobs are left as they are."""
        try:
            with make_client(ctx, url, api_key) as client:
                kind, _ = _kind_of(client, ident)
                body = client.cancel_job(ident) if kind == "job" else client.cancel_sweep(ident)
        except NCServiceError as exc:
            raise _fail(exc) from exc
        if as_json:
            typer.echo(json.dumps(body, indent=1))
            return
        counts = body.get("counts") or {}
        extra = ""
        if kind == "sweep":
            extra = " (" + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) + ")"
        typer.echo(f"{kind} {body['id']} {body['status']}{extra}")

    @app.command(epilog=example("ncservice results 3f2a... --format csv > runs.csv",
                                "ncservice results 3f2a... --format json --out runs.json"))
    def results(ctx: typer.Context, ident: str = typer.Argument(..., metavar="ID", help="a sweep id"),
                fmt: str = typer.Option("csv", "--format", help="csv | json"),
                out: Path = typer.Option(None, "--out", help="write to this file instead of stdout"),
                url: str = URL_OPTION, api_key: str = KEY_OPTION) -> None:
        """A sweep's results: one row per run (config + final metrics), as CSV or JSON."""
        if fmt not in ("csv", "json"):
            raise _fail(ValueError(f"--format: {fmt!r}, expected csv or json"))
        try:
            with make_client(ctx, url, api_key) as client:
                try:
                    data = client.results(ident, fmt)
                except NCServiceError as exc:
                    if exc.status == 404 and _is_job(client, ident):
                        raise _fail(ValueError(f"{ident} is a job, not a sweep; results are per sweep "
                                               f"(use: ncservice status {ident})")) from exc
                    raise
        except NCServiceError as exc:
            raise _fail(exc) from exc
        text = data if fmt == "csv" else json.dumps(data, indent=1)
        if out is not None:
            try:
                out.write_text(text)
            except OSError as exc:
                raise _fail(ValueError(f"--out {out}: {exc.strerror or exc}")) from exc
            typer.echo(f"wrote {out}", err=True)
        else:
            typer.echo(text, nl=not text.endswith("\n"))


def _watch(client: NCClient, ident: str, *, interval: float | None, max_wait: float | None = None) -> str:
    """Poll ``ident`` (job or sweep) and draw one rich progress bar per job until all ended; return the
    final status. Sleeps with the client's sleep function (``Retry-After`` or ``interval``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    kind, body = _kind_of(client, ident)
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                    TimeElapsedColumn())
    tasks: dict[str, Any] = {}
    t0 = time.monotonic()
    with bars:
        while True:
            jobs = (body.get("jobs") or []) if kind == "sweep" else [body]
            for job in jobs:
                prog = job.get("progress") or {}
                if job["id"] not in tasks:
                    tasks[job["id"]] = bars.add_task(job["id"][:8], total=prog.get("total") or None)
                total = prog.get("total") or None
                done = prog.get("epoch") or 0
                if job["status"] == "succeeded" and total:
                    done = total
                label = f"job {job['id'][:8]}" if kind == "job" else f"sweep {ident[:8]} job {job['id'][:8]}"
                bars.update(tasks[job["id"]], total=total, completed=done,
                            description=f"{label} {job['status']:>10}")
            if body["status"] in JOB_TERMINAL:
                break
            if max_wait is not None and time.monotonic() - t0 > max_wait:
                raise TimeoutError(f"{kind} {ident} still {body['status']} after {max_wait} s")
            client._sleep(interval if interval is not None else client.poll_interval)
            body = client.get_job(ident) if kind == "job" else client.get_sweep(ident)
    typer.echo(f"{kind} {ident} {body['status']}")
    return body["status"]

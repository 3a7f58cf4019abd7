"""``ncservice``: the command line of the NC service (typer)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Neural Collapse service: measure features, run the service, submit sweeps.",
                  no_args_is_help=True, add_completion=False)


@app.command(epilog="Example:\n\n  $ ncservice measure H.npy y.npy --weights W.npy --bias b.npy\n\n"
                    "  $ ncservice measure feats.safetensors --json\n\n"
                    "  $ ncservice measure H.npy y.npy --weights W.npy --url http://127.0.0.1:8000  # remote")
def measure(
    ctx: typer.Context,
    features: str = typer.Argument(..., help="features (N, d): .npy/.npz/.safetensors/.pt/.json, or a bundle "
                                   "holding features, labels[, weights, bias] when LABELS is omitted"),
    labels: str = typer.Argument(None, help="labels (N,): .npy/.npz/.safetensors/.pt/.json"),
    weights: str = typer.Option(None, "--weights", help="classifier weights (C, d)"),
    bias: str = typer.Option(None, "--bias", help="classifier bias (C,)"),
    test_features: str = typer.Option(None, "--test-features", help="held-out features for test_* NC4 keys"),
    test_labels: str = typer.Option(None, "--test-labels", help="held-out labels"),
    num_classes: int = typer.Option(None, "--num-classes", help="C (default: max label + 1)"),
    center: str = typer.Option("none", help="cosines of raw features ('none', thesis) or 'global_mean'"),
    global_mean: str = typer.Option("class_mean", "--global-mean", help="'class_mean' (Papyan) or 'sample'"),
    remap_labels: bool = typer.Option(False, "--remap-labels", help="map distinct label ids to 0..K-1"),
    chunk_size: int = typer.Option(65536, "--chunk-size", help="rows per chunk"),
    device: str = typer.Option(None, "--device", help="torch device: cpu, cuda, cuda:N or auto (cuda when "
                               "available); default cpu"),
    as_json: bool = typer.Option(False, "--json", help="print the full result as JSON"),
    url: str = typer.Option(None, "--url", help="measure on this running service (POST /measure) instead of "
                            "in this process"),
    api_key: str = typer.Option(None, "--api-key", envvar="NCS_API_KEY", help="sent as a Bearer token (--url)"),
) -> None:
    """Measure every Neural Collapse metric of FEATURES/LABELS (docs/metrics.md) and print them.

    Locally (default) or on a running service with --url (the same metrics, computed there)."""
    import json
    from pathlib import Path

    from ncengine.errors import NCEngineError
    from ncengine.io import load_array, load_bundle
    from ncengine.metrics import measure as _measure
    from ncservice.client import NCServiceError

    for name, path in (("FEATURES", features), ("LABELS", labels), ("--weights", weights), ("--bias", bias),
                       ("--test-features", test_features), ("--test-labels", test_labels)):
        if path is not None and Path(path).is_dir():
            raise _usage_error(f"{name} {path}: is a directory, expected a file")
    if device is not None:
        device = _check_device(device, local=url is None)
    try:
        if labels is None:
            arrs = load_bundle(features)
        else:
            arrs = {"features": load_array(features, field="features"), "labels": load_array(labels, field="labels")}
        for key, path in (("weights", weights), ("bias", bias), ("test_features", test_features),
                          ("test_labels", test_labels)):
            if path is not None:
                arrs[key] = load_array(path, field=key)
        if url is not None:
            result = _measure_remote(ctx, url, api_key, arrs, num_classes=num_classes, center=center,
                                     global_mean=global_mean, remap_labels=remap_labels)
        else:
            result = _measure(arrs["features"], arrs["labels"], arrs.get("weights"), arrs.get("bias"),
                              num_classes=num_classes, test_features=arrs.get("test_features"),
                              test_labels=arrs.get("test_labels"), center=center, global_mean=global_mean,
                              chunk_size=chunk_size, device=device, remap_labels=remap_labels).to_dict()
    except NCEngineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except NCServiceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(result, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("metric", "value", title=f"NC metrics: N={result['num_samples']}, d={result['dim']}, "
                  f"C={result['num_classes']}")
    for key, value in result.items():
        if isinstance(value, (int, float)) or value is None:
            table.add_row(key, "n/a" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value)))
    bounds = result.get("bounds") or {}
    for key in ("intra_cos_holds", "inter_cos_holds", "nc3_cos_holds"):
        if key in bounds:
            table.add_row(f"bounds.{key}", str(bounds[key]))
    Console().print(table)


def _usage_error(message: str) -> typer.Exit:
    """Print ``error: <message>`` on stderr; the ``typer.Exit(2)`` to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


_DEVICE_EXPECTED = "expected cpu, cuda, cuda:N or auto"


def _check_device(device: str, *, local: bool) -> str:
    """``--device`` checked before any file is read: a torch device string of type cpu or cuda (or ``auto``:
    cuda when available, else cpu). For a local measure (``local``) a cuda device must also exist here.
    Returns the device to use (``auto`` resolved); raises :class:`typer.Exit` (2) with one ``error:`` line."""
    import torch

    text = device.strip()
    if text == "auto":
        return "cuda" if local and torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise _usage_error(f"--device {device!r}: not a torch device string; {_DEVICE_EXPECTED}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise _usage_error(f"--device {device!r}: device type {dev.type!r} is not supported; {_DEVICE_EXPECTED}")
    if dev.type == "cuda" and local:
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise _usage_error(f"--device {device!r}: CUDA is not available here ({why}, torch "
                               f"{torch.__version__}); use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise _usage_error(f"--device {device!r}: no such GPU, this machine has {count} "
                               f"(cuda:0..cuda:{count - 1})")
    return str(dev)


def _measure_remote(ctx: typer.Context, url: str, api_key: str | None, arrs: dict, **options) -> dict:
    """``POST /measure`` of the loaded arrays (``ncservice.client.NCClient.measure``; waits for a queued job)."""
    from ncservice.client_cli import make_client

    options = {k: v for k, v in options.items() if v is not None and v is not False}
    with make_client(ctx, url, api_key) as client:
        return client.measure(arrs["features"], arrs["labels"], arrs.get("weights"), arrs.get("bias"),
                              test_features=arrs.get("test_features"), test_labels=arrs.get("test_labels"),
                              **options)


@app.command(epilog="Example:\n\n  $ ncservice reproduce thesis-fig3.1 --scale small --url http://127.0.0.1:8000 "
                    "--out repro-3.1")
def reproduce(
    ctx: typer.Context,
    preset: str = typer.Argument(..., help="thesis-fig3.1 | thesis-fig3.3"),
    scale: str = typer.Option("small", "--scale", help="small (minutes on CPU) | full (the thesis's sizes)"),
    url: str = typer.Option("http://127.0.0.1:8000", "--url", envvar="NCS_URL", help="the running service"),
    out: str = typer.Option("reproduction", "--out", help="folder for the PNG figures and the CSV"),
    api_key: str = typer.Option(None, "--api-key", envvar="NCS_API_KEY", help="sent as a Bearer token"),
    timeout: float = typer.Option(None, "--timeout", help="seconds to wait for the sweep (default: no limit)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
) -> None:
    """Run a thesis preset as a sweep through the service; write its figures (PNG) and results (CSV) to OUT."""
    from pathlib import Path

    from ncservice.client import NCServiceError
    from ncservice.client_cli import make_client
    from ncservice.reproduce import OutputError
    from ncservice.reproduce import reproduce as _reproduce

    try:
        with make_client(ctx, url, api_key) as client:
            _reproduce(client, preset, scale, Path(out), progress=not no_progress, timeout=timeout, echo=typer.echo)
    except OutputError as exc:  # OUT cannot be made or written to (checked before the sweep is submitted)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
        raise _usage_error(f"--out {out}: {exc.strerror or exc}{where}") from exc
    except (NCServiceError, ValueError, TimeoutError) as exc:
        raise _usage_error(str(exc)) from exc


# service commands: serve, api, worker, reconciler, migrate (ncservice/service.py)
from ncservice import service as _service  # noqa: E402

_service.register(app)

from ncservice.keys_cli import app as _keys_app  # noqa: E402

# client commands: submit, status, watch, cancel, results (ncservice/client_cli.py)
from ncservice import client_cli as _client_cli  # noqa: E402

_client_cli.register(app)

app.add_typer(_keys_app, name="keys", help="API keys: create, list, revoke (stored hashed).")

if __name__ == "__main__":
    app()

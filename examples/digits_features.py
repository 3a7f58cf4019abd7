"""Real features through ``/measure``: a torch MLP trained on scikit-learn's bundled digits (no download).

Steps:
1. Train an MLP ``64 -> 128 -> 128 -> 10`` (ReLU) on the standardised 8x8 digits (N=1797, C=10) with
   full-batch Adam and weight decay until 100% training accuracy (plus ``--extra-epochs`` of terminal phase
   training, where Neural Collapse develops; Papyan et al. 2020). CPU, a few seconds.
2. Extract the penultimate (last hidden layer, post-ReLU) features ``H`` (N, 128) float32, the labels
   ``y`` (N,) int64, the classifier's weights ``W`` (10, 128) and bias ``b`` (10,).
3. Write them into ``--out`` as ``features.npy``, ``labels.npy``, ``weights.npy``, ``bias.npy`` and one
   ``digits_features.safetensors`` holding all four.
4. Upload the ``.npy`` files with httpx (multipart ``features, labels, weights, bias``) to
   ``POST {--url}/measure`` and print the NC metrics and the Theorem 2.3.1 bound block.
5. Compute ``ncengine.metrics.measure(H, y, W, b).to_dict()`` in-process on the same arrays (read back
   from the files) and print the largest absolute and relative differences over every numeric value. Exit
   status 1 when any value differs beyond ``rtol=1e-9`` (``|a - b| > 1e-9 * max(|a|, |b|) + 1e-12``) or the
   keys differ; 2 when the service could not be reached or refused the input.

Run against a service started with ``ncservice serve``::

    python examples/digits_features.py --url http://127.0.0.1:8000 --out digits-out --seed 0

``--offline`` skips the upload (steps 1-3 and the in-process metrics only).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import ncengine  # noqa: F401  (installed: pip install -e .)
except ImportError:  # run from a source checkout without installing: the repository root holds ncengine/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RTOL, ATOL = 1e-9, 1e-12


def load_digits_standardised() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, each pixel standardised (zero mean, unit variance; constant pixels 0).

    Returns:
        ``X`` (1797, 64) float32 and ``y`` (1797,) int64 in ``0..9``.
    """
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    data = load_digits()
    X = StandardScaler().fit_transform(data.data).astype(np.float32)
    return X, data.target.astype(np.int64)


def train_digits(seed: int = 0, hidden: int = 128, lr: float = 1e-2, weight_decay: float = 5e-4,
                 extra_epochs: int = 100, max_epochs: int = 2000) -> dict[str, Any]:
    """Train a two-hidden-layer ReLU MLP on the digits to 100% training accuracy, then ``extra_epochs`` more.

    Full-batch Adam (deterministic on CPU for a given ``seed``). The classifier is ``logits = H W^T + b``
    with ``H`` the post-ReLU output of the second hidden layer.

    Args:
        seed: torch seed of the initialisation.
        hidden: width of both hidden layers (d).
        lr: Adam learning rate.
        weight_decay: L2 coefficient (Adam's coupled weight decay, on every parameter).
        extra_epochs: epochs trained after the first epoch with 100% training accuracy.
        max_epochs: give up (RuntimeError) when 100% is not reached by then.

    Returns:
        ``features`` (N, d) float32, ``labels`` (N,) int64, ``weights`` (C, d) float32, ``bias`` (C,) float32,
        ``train_accuracy`` (float, of the returned model), ``epochs`` (int, total), ``epochs_to_100`` (int)
        and ``train_loss`` (mean cross-entropy of the returned model).

    Raises:
        RuntimeError: 100% training accuracy not reached within ``max_epochs``.
    """
    X_np, y_np = load_digits_standardised()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a (1797, 64) problem: more threads only contend (several times slower)
    try:
        return _train(X_np, y_np, seed, hidden, lr, weight_decay, extra_epochs, max_epochs)
    finally:
        torch.set_num_threads(threads)


def _train(X_np: np.ndarray, y_np: np.ndarray, seed: int, hidden: int, lr: float, weight_decay: float,
           extra_epochs: int, max_epochs: int) -> dict[str, Any]:
    X, y = torch.from_numpy(X_np), torch.from_numpy(y_np)
    C = int(y.max()) + 1
    torch.manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU())
    head = torch.nn.Linear(hidden, C)
    params = [*body.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    reached = None
    epoch = 0
    while epoch < max_epochs:
        opt.zero_grad()
        logits = head(body(X))
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        epoch += 1
        if reached is None:
            with torch.no_grad():
                if bool((head(body(X)).argmax(1) == y).all()):
                    reached = epoch
        if reached is not None and epoch >= reached + extra_epochs:
            break
    with torch.no_grad():
        H = body(X)
        logits = head(H)
        acc = float((logits.argmax(1) == y).double().mean())
        final_loss = float(torch.nn.functional.cross_entropy(logits.double(), y))
    if reached is None or acc < 1.0:
        raise RuntimeError(f"100% training accuracy not reached in {epoch} epochs (accuracy {acc:.4f})")
    return {"features": H.numpy().copy(), "labels": y_np, "weights": head.weight.detach().numpy().copy(),
            "bias": head.bias.detach().numpy().copy(), "train_accuracy": acc, "epochs": epoch,
            "epochs_to_100": reached, "train_loss": final_loss}


ARRAYS = ("features", "labels", "weights", "bias")


def write_arrays(arrays: dict[str, np.ndarray], out: Path) -> dict[str, Path]:
    """Write ``<name>.npy`` per array (``allow_pickle=False``) and ``digits_features.safetensors`` (all four)."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ARRAYS:
        paths[name] = out / f"{name}.npy"
        np.save(paths[name], np.ascontiguousarray(arrays[name]), allow_pickle=False)
    paths["safetensors"] = out / "digits_features.safetensors"
    save_file({name: np.ascontiguousarray(arrays[name]) for name in ARRAYS}, str(paths["safetensors"]))
    return paths


def upload(url: str, paths: dict[str, Path], timeout: float = 120.0) -> dict[str, Any]:
    """``POST {url}/measure`` with the ``.npy`` files as multipart parts; returns the metrics dict.

    Raises:
        RuntimeError: the service answered with an error (its problem+json detail and field in the message)
            or queued a job (202) instead of measuring at once.
        httpx.TransportError: the service could not be reached.
    """
    import httpx

    handles = {name: open(paths[name], "rb") for name in ARRAYS}  # noqa: SIM115 - closed below
    try:
        files = {name: (f"{name}.npy", fh, "application/octet-stream") for name, fh in handles.items()}
        response = httpx.post(f"{url.rstrip('/')}/measure", files=files, timeout=timeout)
    finally:
        for fh in handles.values():
            fh.close()
    if response.status_code == 202:
        raise RuntimeError(f"the service queued a job ({response.headers.get('Location')}); raise its "
                           "measure_sync_max_elements or poll the job")
    if response.status_code >= 400:
        try:
            problem = response.json()
        except ValueError:
            problem = {"detail": response.text}
        raise RuntimeError(f"{response.status_code} {problem.get('title', '')}: {problem.get('detail')} "
                           f"(field {problem.get('field')})")
    return response.json()


def compare(got: Any, want: Any, path: str = "") -> tuple[float, float, list[str]]:
    """Largest absolute and relative difference over every numeric leaf, and the paths that differ.

    A leaf differs when ``|a - b| > RTOL * max(|a|, |b|) + ATOL``, when one side is ``None`` and the other
    not, when a non-numeric value (bool, str) differs, or when the keys / list lengths differ.
    """
    if isinstance(want, dict) and isinstance(got, dict):
        worst_a = worst_r = 0.0
        bad = [f"{path}.{k}: missing on one side" for k in sorted(set(want) ^ set(got))]
        for k in sorted(set(want) & set(got)):
            a, r, b = compare(got[k], want[k], f"{path}.{k}" if path else k)
            worst_a, worst_r, bad = max(worst_a, a), max(worst_r, r), bad + b
        return worst_a, worst_r, bad
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return 0.0, 0.0, [f"{path}: length {len(got)} != {len(want)}"]
        worst_a = worst_r = 0.0
        bad: list[str] = []
        for i, (g, w) in enumerate(zip(got, want)):
            a, r, b = compare(g, w, f"{path}[{i}]")
            worst_a, worst_r, bad = max(worst_a, a), max(worst_r, r), bad + b
        return worst_a, worst_r, bad
    numeric = (int, float)
    if isinstance(want, numeric) and isinstance(got, numeric) and not isinstance(want, bool) \
            and not isinstance(got, bool):
        diff = abs(float(got) - float(want))
        scale = max(abs(float(got)), abs(float(want)))
        rel = diff / scale if scale > 0 else 0.0
        ok = diff <= RTOL * scale + ATOL or (math.isinf(float(got)) and got == want)
        return diff, rel, [] if ok else [f"{path}: {got!r} != {want!r}"]
    return 0.0, 0.0, [] if got == want else [f"{path}: {got!r} != {want!r}"]


def _print_metrics(result: dict[str, Any]) -> None:
    keys = ("num_samples", "dim", "num_classes", "intra_cos_min", "intra_cos_mean", "inter_cos_max",
            "inter_cos_mean", "nc1", "nc1_trace_ratio", "cdnv_mean", "nc2_equinorm", "nc2_equiangularity",
            "nc2_etf_distance", "nc3_self_duality", "nc3_cos_mean", "ncc_accuracy", "classifier_accuracy",
            "ncc_agreement", "loss", "alpha", "beta", "min_loss_m", "epsilon")
    width = max(len(k) for k in keys)
    for key in keys:
        if key in result:
            value = result[key]
            print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    print("  bounds (Theorem 2.3.1):")
    print("    " + json.dumps(result.get("bounds"), indent=2, sort_keys=True).replace("\n", "\n    "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running NC service")
    parser.add_argument("--out", type=Path, default=Path("digits-features"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the network's initialisation")
    parser.add_argument("--extra-epochs", type=int, default=100, help="epochs after reaching 100%% accuracy")
    parser.add_argument("--offline", action="store_true", help="do not upload; in-process metrics only")
    args = parser.parse_args(argv)

    from ncengine.metrics import measure

    t0 = time.perf_counter()
    trained = train_digits(seed=args.seed, extra_epochs=args.extra_epochs)
    print(f"trained on digits: N={trained['features'].shape[0]}, d={trained['features'].shape[1]}, "
          f"100% training accuracy after {trained['epochs_to_100']} epochs, {trained['epochs']} in all, "
          f"loss {trained['train_loss']:.4g} ({time.perf_counter() - t0:.1f} s)")
    paths = write_arrays(trained, args.out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")

    arrays = {name: np.load(paths[name], allow_pickle=False) for name in ARRAYS}
    local = json.loads(json.dumps(measure(arrays["features"], arrays["labels"], arrays["weights"],
                                          arrays["bias"]).to_dict()))
    if args.offline:
        print("in-process metrics (ncengine.metrics.measure):")
        _print_metrics(local)
        return 0
    try:
        remote = upload(args.url, paths)
    except Exception as exc:  # noqa: BLE001 - transport errors and refusals end the script the same way
        print(f"error: upload to {args.url}/measure failed: {exc}", file=sys.stderr)
        return 2
    print(f"metrics from {args.url}/measure:")
    _print_metrics(remote)
    max_abs, max_rel, bad = compare(remote, local)
    (args.out / "measure_service.json").write_text(json.dumps(remote, indent=1))
    (args.out / "measure_local.json").write_text(json.dumps(local, indent=1))
    print(f"service vs in-process measure: max abs difference {max_abs:.3g}, max relative {max_rel:.3g} "
          f"over every numeric value ({'equal' if not bad else f'{len(bad)} differ'} at rtol={RTOL:g})")
    for line in bad[:20]:
        print(f"  differs: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

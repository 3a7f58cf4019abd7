"""Loading features, labels and classifiers from files, safely.

Formats (chosen by suffix): ``.npy`` (memory-mapped, ``allow_pickle=False``), ``.npz`` (named members),
``.safetensors``, ``.pt`` (``torch.load(weights_only=True)`` only) and ``.json`` (nested lists, or an object of
named lists). Object/pickled dtypes are always refused. Size guards for untrusted uploads: ``max_bytes`` bounds
the decoded size of every array (checked from the headers BEFORE anything is decompressed or allocated, so a
zip bomb or a lying header is refused cheaply) and ``max_header_bytes`` bounds a ``.safetensors`` JSON header.
Every problem is an :class:`ncengine.errors.InputError` naming ``field``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ncengine.errors import InputError

__all__ = ["SUFFIXES", "BUNDLE_KEYS", "load_array", "load_bundle"]

SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".json")
BUNDLE_KEYS = ("features", "labels", "weights", "bias", "test_features", "test_labels")
DEFAULT_MAX_HEADER_BYTES = 1 << 20  # safetensors JSON header
_NPY_MAX_HEADER = 10_000  # numpy's own max_header_size for .npy headers
_EXPECTED = "a .npy, .npz, .safetensors, .pt (weights_only) or .json file"

PathOrFile = str | os.PathLike | IO[bytes]


def _suffix(src: PathOrFile, suffix: str | None, field: str) -> str:
    if suffix is None:
        name = src if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "")
        suffix = Path(str(name)).suffix
    suffix = suffix.lower() if suffix.startswith(".") else "." + suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(field, f"unsupported file type {suffix!r}", expected=_EXPECTED)
    if isinstance(src, (str, os.PathLike)) and not os.path.isfile(src):
        raise InputError(field, f"no such file: {os.fspath(src)}", expected=_EXPECTED)
    return suffix


def _check_dtype(dtype: np.dtype, field: str) -> None:
    if dtype.hasobject or dtype.kind in "OVUSMm":
        raise InputError(field, f"dtype {dtype} is not allowed (object, string and structured arrays are refused)",
                         expected="a numeric array")


def _check_size(nbytes: int, max_bytes: int | None, field: str) -> None:
    if max_bytes is not None and nbytes > max_bytes:
        raise InputError(field, f"array of {nbytes} bytes exceeds the limit of {max_bytes} bytes",
                         expected=f"at most {max_bytes} bytes")


def _npy_header(f: IO[bytes], field: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            # refuse a lying header length before numpy asks the file for that many bytes
            pos = f.tell()
            (hlen,) = struct.unpack("<I", f.read(4))
            if hlen > _NPY_MAX_HEADER:
                raise ValueError(f"header of {hlen} bytes exceeds {_NPY_MAX_HEADER}")
            f.seek(pos)
            # 3.0 differs from 2.0 only by a utf-8 header, which only structured dtypes (refused) need
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, SyntaxError, TypeError, KeyError, struct.error) as exc:
        raise InputError(field, f"not a valid .npy array ({exc})", expected=".npy format") from exc
    return shape, fortran, dtype


def _load_npy(src: PathOrFile, field: str, max_bytes: int | None, mmap: bool) -> np.ndarray:
    is_path = isinstance(src, (str, os.PathLike))
    f = open(src, "rb") if is_path else src  # noqa: SIM115
    try:
        start = f.tell()
        shape, _, dtype = _npy_header(f, field)
        _check_dtype(dtype, field)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        _check_size(nbytes, max_bytes, field)
        f.seek(start)
        try:
            if is_path and mmap:
                return np.load(src, mmap_mode="r", allow_pickle=False)
            return np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(field, f"could not read the .npy array ({exc})", expected=".npy format") from exc
    finally:
        if is_path:
            f.close()


def _npz_members(src: PathOrFile, field: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(src)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(field, f"not a valid .npz archive ({exc})", expected=".npz (zip of .npy)") from exc


def _npz_read(zf: zipfile.ZipFile, name: str, field: str, max_bytes: int | None) -> np.ndarray:
    info = zf.getinfo(name)
    _check_size(info.file_size, None if max_bytes is None else max_bytes + 4096, field)  # declared, incl. header
    try:
        with zf.open(info) as f:
            shape, _, dtype = _npy_header(f, field)
            _check_dtype(dtype, field)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            _check_size(nbytes, max_bytes, field)
            if nbytes > info.file_size:
                raise InputError(field, f"member {name!r} declares {nbytes} bytes of data but holds "
                                 f"{info.file_size}", expected="a consistent .npy member")
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)  # never more than the declared, size-checked, amount
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as exc:
        raise InputError(field, f"could not read member {name!r} ({exc})", expected=".npz (zip of .npy)") from exc


def _npz_names(zf: zipfile.ZipFile) -> dict[str, str]:
    """Array name -> member name (``x.npy`` -> ``x``)."""
    return {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}


def _safetensors_header(src: PathOrFile, field: str, max_header_bytes: int) -> tuple[dict, int]:
    is_path = isinstance(src, (str, os.PathLike))
    f = open(src, "rb") if is_path else src  # noqa: SIM115
    try:
        raw = f.read(8)
        if len(raw) != 8:
            raise InputError(field, "file too short for a .safetensors header", expected=".safetensors format")
        (n,) = struct.unpack("<Q", raw)
        if n > max_header_bytes:
            raise InputError(field, f".safetensors header of {n} bytes exceeds the limit of {max_header_bytes}",
                             expected=f"a header of at most {max_header_bytes} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(field, f"invalid .safetensors header ({exc})", expected=".safetensors format") from exc
        if not isinstance(header, dict):
            raise InputError(field, "invalid .safetensors header", expected=".safetensors format")
        header.pop("__metadata__", None)
        return header, 8 + n
    finally:
        if is_path:
            f.close()


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}


def _load_safetensors(src: PathOrFile, names: list[str] | None, field: str, max_bytes: int | None,
                      max_header_bytes: int) -> dict[str, np.ndarray]:
    header, _ = _safetensors_header(src, field, max_header_bytes)
    wanted = list(header) if names is None else [n for n in names if n in header]
    for name in wanted:
        meta = header[name]
        if not isinstance(meta, dict) or meta.get("dtype") not in _ST_ITEMSIZE:
            raise InputError(field, f"tensor {name!r} has an unsupported dtype {meta.get('dtype')!r}",
                             expected="a numeric dtype")
        nbytes = int(np.prod(meta.get("shape", []), dtype=np.int64)) * _ST_ITEMSIZE[meta["dtype"]]
        _check_size(nbytes, max_bytes, field)
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        if isinstance(src, (str, os.PathLike)):
            from safetensors import safe_open

            out = {}
            with safe_open(str(src), framework="pt") as f:
                for name in wanted:
                    out[name] = _torch_to_numpy(f.get_tensor(name))
            return out
        src.seek(0)
        tensors = st_load(src.read())
        return {name: _torch_to_numpy(tensors[name]) for name in wanted}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(field, f"could not read the .safetensors file ({exc})", expected=".safetensors") from exc


def _torch_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)  # exact: every bfloat16 is a float32
    return t.numpy()


def _load_pt(src: PathOrFile, field: str, max_bytes: int | None) -> Any:
    if max_bytes is not None:
        size = os.path.getsize(src) if isinstance(src, (str, os.PathLike)) else None
        if size is not None:
            _check_size(size, max_bytes + (1 << 16), field)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler met a global it does not allow
        raise InputError(field, "refused: the .pt file holds Python objects other than tensors/containers (only "
                         "torch.load(weights_only=True) is used; pickled code is never run)",
                         expected="tensors saved with torch.save (no pickled objects)") from exc
    except Exception as exc:  # torch raises RuntimeError, KeyError, ... for broken files
        # torch's own text can be long and may advise weights_only=False, which must never be suggested
        raise InputError(field, f"could not read the .pt file ({type(exc).__name__}): not a readable "
                         "torch.save archive", expected="tensors saved with torch.save (no pickled objects)") from exc
    return obj


def _load_json(src: PathOrFile, field: str, max_bytes: int | None) -> Any:
    try:
        if isinstance(src, (str, os.PathLike)):
            if max_bytes is not None:
                _check_size(os.path.getsize(src), 32 * max_bytes, field)  # text is ~<= 25 bytes per float64
            with open(src, "rb") as f:
                return json.load(f)
        return json.load(src)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(field, f"invalid JSON ({exc})", expected="a JSON list (or an object of lists)") from exc


def _json_array(obj: Any, field: str, max_bytes: int | None) -> np.ndarray:
    try:
        arr = np.asarray(obj)
    except (ValueError, TypeError) as exc:
        raise InputError(field, f"not a rectangular numeric array ({exc})", expected="nested lists of numbers") from exc
    if arr.dtype == object or arr.dtype.kind in "USb":
        raise InputError(field, "not a rectangular numeric array", expected="nested lists of numbers")
    _check_size(arr.nbytes, max_bytes, field)
    return arr


def _pick(container: dict[str, Any], field: str) -> Any:
    role = field
    if role in container:
        return container[role]
    if len(container) == 1:
        return next(iter(container.values()))
    raise InputError(field, f"the file holds {sorted(container)[:10]} but no array named {role!r}",
                     expected=f"one array, or one named {role!r}")


def _finish(x: Any, field: str, max_bytes: int | None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = _torch_to_numpy(x)
    if not isinstance(x, np.ndarray):
        x = _json_array(x, field, max_bytes)
    _check_dtype(x.dtype, field)
    _check_size(x.nbytes, max_bytes, field)
    return x


def load_array(path_or_file: PathOrFile, *, field: str, max_bytes: int | None = None,
               max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, suffix: str | None = None,
               mmap: bool = True) -> np.ndarray:
    """Load one array from a file, safely.

    Args:
        path_or_file: a path, or a binary file object (then give ``suffix`` unless it has a ``name``).
        field: the input's name (``features``, ``labels``, ``weights``, ...), used in errors and to pick the
            member of a ``.npz``/``.safetensors``/``.pt``/JSON-object container holding several arrays.
        max_bytes: refuse arrays whose decoded size exceeds this many bytes (checked from headers first).
        max_header_bytes: refuse ``.safetensors`` headers larger than this.
        suffix: file type override (``.npy``, ``.npz``, ``.safetensors``, ``.pt``, ``.json``).
        mmap: memory-map ``.npy`` paths (read-only ``np.memmap``; nothing is read until used).

    Returns:
        The array (an ``np.memmap`` for a ``.npy`` path). bfloat16 tensors come back as float32 (exact).

    Raises:
        InputError: no such file, unsupported suffix, malformed file, object/pickled dtype, size over the
            limits, or a container without a unique matching array. ``InputError.field`` is ``field``.
    """
    suf = _suffix(path_or_file, suffix, field)
    if suf == ".npy":
        return _load_npy(path_or_file, field, max_bytes, mmap)
    if suf == ".npz":
        with _npz_members(path_or_file, field) as zf:
            names = _npz_names(zf)
            key = field if field in names else (next(iter(names)) if len(names) == 1 else None)
            if key is None:
                raise InputError(field, f"the archive holds {sorted(names)[:10]} but no array named {field!r}",
                                 expected=f"one array, or one named {field!r}")
            return _npz_read(zf, names[key], field, max_bytes)
    if suf == ".safetensors":
        header, _ = _safetensors_header(path_or_file, field, max_header_bytes)
        if hasattr(path_or_file, "seek"):
            path_or_file.seek(0)
        key = field if field in header else (next(iter(header)) if len(header) == 1 else None)
        if key is None:
            raise InputError(field, f"the file holds {sorted(header)[:10]} but no tensor named {field!r}",
                             expected=f"one tensor, or one named {field!r}")
        return _load_safetensors(path_or_file, [key], field, max_bytes, max_header_bytes)[key]
    if suf == ".pt":
        obj = _load_pt(path_or_file, field, max_bytes)
        if isinstance(obj, dict):
            obj = _pick(obj, field)
        return _finish(obj, field, max_bytes)
    obj = _load_json(path_or_file, field, max_bytes)
    if isinstance(obj, dict):
        obj = _pick(obj, field)
    return _finish(obj, field, max_bytes)


def load_bundle(path: PathOrFile, *, field: str = "bundle", max_bytes: int | None = None,
                max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, suffix: str | None = None,
                require: tuple[str, ...] = ("features", "labels")) -> dict[str, np.ndarray]:
    """Load the named arrays ``features``, ``labels``, ``weights``, ``bias`` (and ``test_features``,
    ``test_labels``) from one ``.npz``, ``.safetensors``, ``.pt`` (dict of tensors) or ``.json`` (object) file.

    Args:
        path: the file (path or binary file object).
        field: the upload's name for errors about the file as a whole; errors about one member name it.
        max_bytes: per-array decoded size limit (checked from headers before decompressing).
        max_header_bytes: ``.safetensors`` header limit.
        suffix: file type override.
        require: members that must be present.

    Returns:
        ``{name: array}`` for the members of :data:`BUNDLE_KEYS` present; other members are ignored.

    Raises:
        InputError: no such file, bad or unsupported file, a required member missing (named), or a member
            over the limits.
    """
    suf = _suffix(path, suffix, field)
    out: dict[str, np.ndarray] = {}
    if suf == ".npz":
        with _npz_members(path, field) as zf:
            names = _npz_names(zf)
            for key in BUNDLE_KEYS:
                if key in names:
                    out[key] = _npz_read(zf, names[key], key, max_bytes)
    elif suf == ".safetensors":
        out = _load_safetensors(path, list(BUNDLE_KEYS), field, max_bytes, max_header_bytes)
    elif suf in (".pt", ".json"):
        obj = _load_pt(path, field, max_bytes) if suf == ".pt" else _load_json(path, field, max_bytes)
        if not isinstance(obj, dict):
            raise InputError(field, f"a bundle must map names to arrays, got {type(obj).__name__}",
                             expected=f"an object with keys among {list(BUNDLE_KEYS)}")
        out = {k: _finish(obj[k], k, max_bytes) for k in BUNDLE_KEYS if k in obj}
    else:
        raise InputError(field, f"a bundle cannot be a {suf} file (it holds one array)",
                         expected="a .npz, .safetensors, .pt or .json bundle")
    for key in require:
        if key not in out:
            raise InputError(key, f"missing from the {suf} bundle (it holds {sorted(out)})",
                             expected=f"a member named {key!r}")
    return out

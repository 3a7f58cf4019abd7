"""Streaming uploads: multipart bodies go to disk chunk by chunk, never whole into memory.

``stream_multipart`` feeds the request body, chunk by chunk as it arrives, to python-multipart's push parser
(in a worker thread, so disk writes never block the event loop). Each file part is written straight to
``<dest>/<field><suffix>`` while its sha256 is updated; a running byte count over the whole body enforces
``max_bytes`` (413 problem+json as soon as it is crossed, and up front from ``Content-Length``). Client file
names never become paths: only the field name and a whitelisted suffix do.

``read_body_limited`` does the same size accounting for non-multipart (JSON) bodies.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import IO

import anyio
import python_multipart
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

from api.problems import ApiProblem

#: Suffixes ``ncengine.io.load_array`` understands; anything else is refused before a byte is stored.
ARRAY_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".json")
MAX_FIELD_BYTES = 64 * 1024  # a non-file form field (e.g. ``options`` JSON) larger than this is refused


@dataclass
class SavedFile:
    """One uploaded file, on disk.

    Attributes:
        field: the form field name (e.g. ``features``).
        filename: the client's file name (informational only; never used as a path).
        path: where the bytes are, ``<dest>/<field><suffix>``.
        bytes: its size in bytes.
        sha256: hex digest of its bytes, computed while streaming.
    """

    field: str
    filename: str
    path: Path
    bytes: int
    sha256: str


@dataclass
class ParsedForm:
    """The result of :func:`stream_multipart`: saved files, small text fields, and the folder holding them."""

    directory: Path
    files: dict[str, SavedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    total_bytes: int = 0


def _too_large(max_bytes: int) -> ApiProblem:
    return ApiProblem(413, "payload-too-large", f"the request body exceeds the limit of {max_bytes} bytes",
                      field="body", extra={"max_bytes": max_bytes})


def check_content_length(request: Request, max_bytes: int) -> None:
    """Raise 413 up front when the declared ``Content-Length`` already exceeds ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)


async def read_body_limited(request: Request, max_bytes: int) -> bytes:
    """Read a (JSON) body, refusing with 413 as soon as more than ``max_bytes`` arrived."""
    check_content_length(request, max_bytes)
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ApiProblem(400, "client-disconnect", "the client disconnected mid-body", field="body") from exc
    return b"".join(chunks)


class _Sink:
    """python-multipart callbacks that write file parts to disk with a running size limit and sha256."""

    def __init__(self, form: ParsedForm, *, allowed_files: frozenset[str], allowed_fields: frozenset[str],
                 suffixes: tuple[str, ...]) -> None:
        self.form = form
        self.allowed_files = allowed_files
        self.allowed_fields = allowed_fields
        self.suffixes = suffixes
        self._hname = b""
        self._hval = b""
        self._disposition = b""
        self._name = ""
        self._filename: str | None = None
        self._fh: IO[bytes] | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._text = bytearray()

    # header callbacks ------------------------------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._disposition = b""
        self._name, self._filename, self._fh = "", None, None
        self._hash, self._size, self._text = hashlib.sha256(), 0, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hval += data[start:end]

    def on_header_end(self) -> None:
        if self._hname.lower() == b"content-disposition":
            self._disposition = self._hval
        self._hname, self._hval = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiProblem(400, "malformed-multipart", 'a part has no Content-Disposition "name"',
                             field="body")
        name = options[b"name"].decode("utf-8", "replace")
        self._name = name
        if name in self.form.files or name in self.form.fields:
            raise ApiProblem(422, "duplicate-field", f"field {name!r} was sent twice", field=name)
        if b"filename" not in options:
            if name not in self.allowed_fields:
                if name in self.allowed_files:
                    raise ApiProblem(422, "file-expected", f"field {name!r} must be a file upload",
                                     field=name)
                raise ApiProblem(422, "unknown-field", f"unknown form field {name!r}; expected one of "
                                 f"{sorted(self.allowed_files | self.allowed_fields)}", field=name)
            return
        if name not in self.allowed_files:
            raise ApiProblem(422, "unknown-field", f"unknown file field {name!r}; expected one of "
                             f"{sorted(self.allowed_files)}", field=name)
        filename = options[b"filename"].decode("utf-8", "replace")
        suffix = PurePath(filename).suffix.lower()
        if suffix not in self.suffixes:
            raise ApiProblem(422, "unsupported-file-type",
                             f"{name}: file {filename!r} has suffix {suffix or '(none)'!r}; expected one of "
                             f"{list(self.suffixes)}", field=name)
        self._filename = filename
        path = self.form.directory / f"{name}{suffix}"
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in on_part_end or by stream_multipart on error
        self.form.files[name] = SavedFile(field=name, filename=filename, path=path, bytes=0, sha256="")

    # data callbacks --------------------------------------------------------------------------------------
    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        piece = data[start:end]
        if self._fh is not None:
            self._fh.write(piece)
            self._hash.update(piece)
            self._size += len(piece)
        else:
            if len(self._text) + len(piece) > MAX_FIELD_BYTES:
                raise ApiProblem(413, "field-too-large",
                                 f"form field {self._name!r} exceeds {MAX_FIELD_BYTES} bytes", field=self._name)
            self._text.extend(piece)

    def on_part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            saved = self.form.files[self._name]
            saved.bytes, saved.sha256 = self._size, self._hash.hexdigest()
        elif self._name:
            self.form.fields[self._name] = self._text.decode("utf-8", "replace")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}


async def stream_multipart(request: Request, dest: Path, *, max_bytes: int, allowed_files: set[str] | frozenset[str],
                           allowed_fields: set[str] | frozenset[str] = frozenset(),
                           suffixes: tuple[str, ...] = ARRAY_SUFFIXES) -> ParsedForm:
    """Stream a ``multipart/form-data`` body into ``dest`` (created; removed again on any error).

    Args:
        request: the incoming request (its body is consumed).
        dest: a fresh folder for this request's files.
        max_bytes: limit on the whole body in bytes; crossing it answers 413 at once.
        allowed_files: names of the file fields accepted; any other file field is refused (422).
        allowed_fields: names of the small text fields accepted (each at most ``MAX_FIELD_BYTES``).
        suffixes: accepted file name suffixes (lower case, with the dot).

    Returns:
        The saved files (size and sha256 each) and the text fields.

    Raises:
        ApiProblem: 413 too large, 400 malformed multipart or missing boundary, 422 unknown/duplicate field or
            unsupported suffix (``field`` names the part).
    """
    check_content_length(request, max_bytes)
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiProblem(400, "malformed-multipart", "multipart/form-data without a boundary", field="body")
    dest.mkdir(parents=True, exist_ok=False)
    form = ParsedForm(directory=dest)
    sink = _Sink(form, allowed_files=frozenset(allowed_files), allowed_fields=frozenset(allowed_fields),
                 suffixes=suffixes)
    parser = python_multipart.MultipartParser(boundary, sink.callbacks())
    try:
        async for chunk in request.stream():
            form.total_bytes += len(chunk)
            if form.total_bytes > max_bytes:
                raise _too_large(max_bytes)
            if chunk:
                await anyio.to_thread.run_sync(parser.write, chunk)
        await anyio.to_thread.run_sync(parser.finalize)
        if sink._fh is not None or parser.state != MultipartState.END:
            raise ApiProblem(400, "malformed-multipart", "the multipart body is truncated (no closing boundary)",
                             field="body")
    except FormParserError as exc:
        sink.close()
        shutil.rmtree(dest, ignore_errors=True)
        raise ApiProblem(400, "malformed-multipart", f"invalid multipart body: {exc}", field="body") from exc
    except ClientDisconnect as exc:
        sink.close()
        shutil.rmtree(dest, ignore_errors=True)
        raise ApiProblem(400, "client-disconnect", "the client disconnected mid-upload", field="body") from exc
    except BaseException:
        sink.close()
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return form

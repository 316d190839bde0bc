"""Stream a request body to a file chunk by chunk: raw bodies, or the `file` part of a multipart form.

Nothing holds the whole upload: each chunk from the socket is hashed, counted against the limit and
written, so a 100 MB upload costs one chunk of memory and a body over the limit is refused (413) as
soon as the limit is crossed, whether or not the client sent a Content-Length.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import unquote

from python_multipart.multipart import MultipartParser, parse_options_header

from service.api.errors import ApiError

RAW_TYPES = (
    "application/x-ndjson",
    "application/jsonl",
    "application/jsonlines",
    "application/json-lines",
    "application/octet-stream",
    "text/plain",
)
BINARY = {"type": "string", "format": "binary"}
MAX_FIELD_BYTES = 1024  # non-file form fields (the dataset name)
_EXT_FILENAME = re.compile(rb"""filename\*\s*=\s*([A-Za-z0-9_-]*)'[^']*'([^;\s]*)""", re.IGNORECASE)


def part_filename(disposition: bytes, params: dict[bytes, bytes]) -> str | None:
    """The file name a Content-Disposition header gives: RFC 5987's `filename*=UTF-8''%C3%BC.jsonl` when
    present (python-multipart ignores it), else `filename="..."` as UTF-8 (what browsers and curl send)."""
    ext = _EXT_FILENAME.search(disposition)
    if ext:
        charset = ext.group(1).decode() or "utf-8"
        try:
            return unquote(ext.group(2).decode("ascii", "replace"), encoding=charset, errors="replace")
        except LookupError:  # an unknown charset
            return unquote(ext.group(2).decode("ascii", "replace"), errors="replace")
    fn = params.get(b"filename")
    return fn.decode("utf-8", "replace") if fn else None


DATASET_HINT = "split the dataset or raise CLTUNE_MAX_UPLOAD_BYTES"


def too_large(limit: int, hint: str = DATASET_HINT) -> ApiError:
    mb = limit / (1024 * 1024)
    return ApiError(
        413,
        "payload_too_large",
        f"upload exceeds the limit of {limit} bytes ({mb:.1f} MiB); {hint}",
        limit_bytes=limit,
    )


class Digest(Protocol):
    """What Sink needs of a hashlib hash object."""

    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass
class Sink:
    """Hashes, counts and writes bytes; raises 413 once more than `limit` bytes arrive."""

    fh: IO[bytes]
    limit: int
    size: int = 0
    digest: Digest = field(default_factory=hashlib.sha256)
    hint: str = DATASET_HINT  # what to do about a 413

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise too_large(self.limit, self.hint)
        self.digest.update(data)
        self.fh.write(data)

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()


@dataclass
class Received:
    size: int
    sha256: str
    filename: str | None  # multipart: the file part's filename
    fields: dict[str, str]  # multipart: small text fields (e.g. name)


async def receive_raw(
    chunks: AsyncIterator[bytes], dest: Path, limit: int, hint: str = DATASET_HINT
) -> Received:
    with dest.open("wb") as fh:
        sink = Sink(fh, limit, hint=hint)
        async for chunk in chunks:
            sink.write(chunk)
    return Received(sink.size, sink.sha256, None, {})


async def receive_multipart(
    chunks: AsyncIterator[bytes],
    content_type: str,
    dest: Path,
    limit: int,
    hint: str = DATASET_HINT,
    example: str = "send the JSONL as -F file=@data.jsonl (and optionally -F name=...)",
) -> Received:
    """Write the part named `file` to `dest`; keep other (small) fields. 422 if there is no file part
    (`example` says how to send one); over `limit` bytes, 413 with `hint`."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_request", "multipart/form-data body without a boundary parameter")
    with dest.open("wb") as fh:
        parts = _Parts(Sink(fh, limit, hint=hint))
        parser = MultipartParser(boundary, parts.callbacks(), max_header_count=16)
        async for chunk in chunks:
            try:
                parser.write(chunk)
            except ApiError:
                raise
            except Exception as e:  # the parser's own errors: a malformed body is the client's problem
                raise ApiError(400, "invalid_request", f"malformed multipart body: {e}") from None
        parser.finalize()  # checks nothing (python-multipart): a body cut short ends without "--boundary--"
    if not parts.complete:
        raise ApiError(
            400,
            "invalid_request",
            "multipart body ends without its closing boundary: the upload was cut short; send it again",
        )
    if not parts.got_file:
        raise ApiError(
            422, "invalid_request", f"multipart upload without a 'file' part; {example}", field="file"
        )
    return Received(parts.sink.size, parts.sink.sha256, parts.filename, parts.fields)


class _Parts:
    """Callbacks for python-multipart's push parser: route each part's bytes by its form field name."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.got_file = False
        self.complete = False  # the closing boundary was seen
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._header = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._buf = bytearray()

    def callbacks(self) -> Any:  # python_multipart's MultipartCallbacks TypedDict
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._hfield,
            "on_header_value": self._hvalue,
            "on_header_end": self._hend,
            "on_headers_finished": self._hdone,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._complete,
        }

    def _complete(self) -> None:
        self.complete = True

    def _begin(self) -> None:
        self._headers, self._name, self._buf = {}, None, bytearray()

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _hend(self) -> None:
        self._headers[self._header.lower()] = self._value
        self._header, self._value = b"", b""

    def _hdone(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"")
        _, params = parse_options_header(disposition)
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self.got_file:
                raise ApiError(
                    422, "invalid_request", "send exactly one 'file' part per upload", field="file"
                )
            self.got_file = True
            self.filename = part_filename(disposition, params)

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self.sink.write(data[start:end])
        elif len(self._buf) + (end - start) <= MAX_FIELD_BYTES:
            self._buf += data[start:end]
        else:
            raise ApiError(
                422,
                "invalid_request",
                f"form field {self._name!r} exceeds {MAX_FIELD_BYTES} bytes",
                field=self._name,
            )

    def _end(self) -> None:
        if self._name and self._name != "file":
            self.fields[self._name] = self._buf.decode("utf-8", "replace")


def upload_doc(fields: dict[str, dict[str, Any]], raw_types: tuple[str, ...]) -> dict[str, Any]:
    """The OpenAPI request body of an upload route (its handler reads the stream itself): a multipart
    form with a `file` part and the form `fields`, or a raw body of one of `raw_types`."""
    form = {"type": "object", "required": ["file"], "properties": {"file": BINARY, **fields}}
    content = {"multipart/form-data": {"schema": form}, **{t: {"schema": BINARY} for t in raw_types}}
    return {"requestBody": {"required": True, "content": content}}

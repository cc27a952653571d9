"""Reads a multipart upload into memory, enforcing the byte limit while it streams in.

Starlette's ``UploadFile`` spools parts over 1 MB to a temporary file; photos of patients must never touch
the disk, so the body is read with ``request.stream()`` and parsed with python-multipart's streaming parser
into memory. The size limit is checked against Content-Length first and then against the bytes actually
received, so an oversized upload is refused (413) before anything is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from service.errors import ServiceError


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Upload:
    """The uploaded file: its bytes and what the client said about it (used for nothing but messages)."""

    data: bytes
    filename: str | None
    content_type: str | None
    #: The small text fields asked for (options sent as form fields), by name.
    fields: dict[str, str] = field(default_factory=dict)


def _too_large(limit: int) -> ServiceError:
    return ServiceError(413, "payload_too_large", f"the upload is over the limit of {limit} bytes")


#: Longest text field kept (an option's value is a few characters).
MAX_FIELD_BYTES = 256


class _InMemoryMultipart:
    """Collects the parts of one multipart body: the wanted file field's, and the named text fields'."""

    def __init__(self, boundary: bytes, wanted: str, text_fields: frozenset[str] = frozenset()) -> None:
        self.wanted = wanted.encode()
        self.text_fields = {name.encode() for name in text_fields}
        self.found: _Part | None = None
        self.fields: dict[bytes, bytearray] = {}
        self.finished = False
        self._part = _Part()
        self._keep = False
        self._text: bytearray | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_end": self._on_end,
            },
        )

    def _on_part_begin(self) -> None:
        self._part = _Part()
        self._keep = False

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part.headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name == self.wanted and self.found is not None:
            # Which of two photos to segment is not ours to guess.
            raise ServiceError(
                422, "validation_error", f"{self.wanted.decode()}: one photo per request (got several)"
            )
        self._keep = name == self.wanted
        self._text = None
        if self._keep:
            self.found = self._part
        elif name in self.text_fields and name not in self.fields:
            self._text = self.fields[name] = bytearray()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keep:
            self._part.data += data[start:end]
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise ServiceError(422, "validation_error", "a form field is longer than any option's value")

    def _on_part_end(self) -> None:
        self._keep = False

    def _on_end(self) -> None:
        self.finished = True


async def read_upload(
    request: Request,
    field_name: str,
    max_bytes: int,
    text_fields: frozenset[str] = frozenset(),
    timeout_s: float | None = None,
) -> Upload:
    """Reads the body of a ``multipart/form-data`` request and returns the part called ``field_name``.

    Text parts named in ``text_fields`` are kept too (the first of each name, at most
    :data:`MAX_FIELD_BYTES`); every other part is skipped without being buffered.

    The whole body must arrive within ``timeout_s``: a slow or stalled upload would otherwise hold its
    connection (and its buffered bytes) for as long as the client likes.

    Raises:
        ServiceError: 415 (not multipart), 413 ``payload_too_large``, 400 ``malformed_request``, 408
            ``request_timeout``, or 422 ``validation_error`` when the field is missing or given twice.
    """
    media_type, options = parse_options_header(request.headers.get("content-type"))
    if media_type != b"multipart/form-data":
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"send the photo as multipart/form-data in a field named {field_name!r}",
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise ServiceError(400, "malformed_request", "multipart/form-data without a boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)

    try:
        form = _InMemoryMultipart(boundary, field_name, text_fields)
    except ValueError as error:  # e.g. a boundary longer than the RFC allows
        raise ServiceError(400, "malformed_request", f"bad multipart boundary: {error}") from None
    received = 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise _too_large(max_bytes)
                if chunk:
                    form.parser.write(chunk)
        form.parser.finalize()
    except TimeoutError:
        raise ServiceError(
            408,
            "request_timeout",
            f"the upload did not arrive within {timeout_s:g} s ({received} bytes received)",
            headers={"Connection": "close"},
        ) from None
    except FormParserError as error:
        raise ServiceError(400, "malformed_request", f"malformed multipart body: {error}") from None
    except ClientDisconnect:
        # Nobody is left to read the answer; a 400 keeps it out of the error log and the 5xx counts.
        raise ServiceError(400, "malformed_request", "the client disconnected during the upload") from None

    if not form.finished:
        raise ServiceError(400, "malformed_request", "the multipart body ends before its closing boundary")
    part = form.found
    if part is None:
        raise ServiceError(422, "validation_error", f"{field_name}: field required (a multipart file field)")
    _, disposition = parse_options_header(part.headers.get(b"content-disposition", b""))
    filename = disposition.get(b"filename")
    content_type = part.headers.get(b"content-type")
    return Upload(
        data=bytes(part.data),
        filename=filename.decode("utf-8", "replace") if filename is not None else None,
        content_type=content_type.decode("latin-1") if content_type is not None else None,
        fields={name.decode(): value.decode("utf-8", "replace") for name, value in form.fields.items()},
    )


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """Reads a whole request body into memory under the same byte limit and deadline as :func:`read_upload`.

    For bodies that are not multipart (the Open Inference Protocol's JSON or binary tensors).

    Raises:
        ServiceError: 413 ``payload_too_large``, 408 ``request_timeout``, 400 ``malformed_request`` when
            the client disconnects or the body is compressed (Content-Encoding is not supported).
    """
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise ServiceError(400, "malformed_request", "compressed request bodies are not supported")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise _too_large(max_bytes)
    except TimeoutError:
        raise ServiceError(
            408,
            "request_timeout",
            f"the body did not arrive within {timeout_s:g} s ({len(body)} bytes received)",
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:
        raise ServiceError(400, "malformed_request", "the client disconnected during the upload") from None
    return bytes(body)

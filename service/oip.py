"""The Open Inference Protocol (KServe V2 / Triton REST) on the wire: request parsing and response encoding.

Two encodings, as in kserve/open-inference-protocol ``inference_rest.md`` and Triton's binary tensor data
extension (``extension_binary_data.md``):

* JSON: the body is one JSON object; tensor ``data`` is a flat, row-major JSON array. A ``BYTES`` element
  is a JSON string; JSON cannot carry arbitrary bytes, so the photo is sent **base64-encoded** there.
* binary: the body is the JSON object (``Inference-Header-Content-Length`` bytes) followed by the tensors'
  raw bytes, in the order the JSON lists them, each sized by its ``binary_data_size`` parameter: numbers
  little-endian, and each ``BYTES`` element a 4-byte little-endian length and the bytes themselves.

This module knows nothing of segmentation: it turns bytes into an :class:`InferRequest` and
:class:`Tensor` s into bytes, raising :class:`~service.errors.ServiceError` (400) for what is malformed.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from service.errors import ServiceError

#: Header giving the JSON object's length when binary tensor data follows it.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The extension this server implements (listed in the server metadata).
BINARY_EXTENSION = "binary_tensor_data"
BINARY_MEDIA_TYPE = "application/octet-stream"
JSON_MEDIA_TYPE = "application/json"

#: Protocol datatype of each numpy dtype the service answers with.
DATATYPES: dict[str, np.dtype[Any]] = {
    "UINT8": np.dtype("<u1"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
}

#: ``str(n)`` for every byte value: joining these is 4× faster than ``json.dumps`` on a UINT8 image.
_UINT8_TEXT = np.array([str(value) for value in range(256)], dtype=object)


def bad_request(message: str, code: str = "invalid_inference_request") -> ServiceError:
    return ServiceError(400, code, message)


# --- wire models (the OpenAPI contract of the V2 routes) --------------------------------------------------


class V2Error(BaseModel):
    """The protocol's error object; ``code`` is DermaSeg's stable reason (clients read ``error`` only)."""

    error: str = Field(description="What went wrong, for people.")
    code: str = Field(description="Stable machine-readable reason, e.g. undecodable_image.")


class ServerMetadata(BaseModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    """``GET /v2/health/live``."""

    live: bool


class ServerReady(BaseModel):
    """``GET /v2/health/ready``."""

    ready: bool


class ModelReady(BaseModel):
    """``GET /v2/models/{model_name}/ready``."""

    name: str
    ready: bool


class TensorMetadata(BaseModel):
    """An input or output: its name, datatype and shape (-1 for a size known only per request)."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{model_name}``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ResponseTensor(BaseModel):
    """An output in the JSON answer: ``data`` when JSON, ``parameters.binary_data_size`` when binary."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, int] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    """``POST /v2/models/{model_name}/infer``: the JSON object (followed by binary tensors, if any)."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseTensor]


# --- requests -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: its BYTES inputs' elements, its parameters and the outputs asked for.

    Attributes:
        id: the client's request id, echoed in the answer.
        parameters: request-level parameters (options and ``binary_data_output``).
        inputs: each input's elements (only ``BYTES`` inputs of shape ``[n]`` are read), by name.
        outputs: the outputs asked for, or None for all of them.
        shapes: each input's shape, by name.
    """

    id: str | None
    parameters: dict[str, Any]
    inputs: dict[str, list[bytes]]
    outputs: list[RequestedOutput] | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be a JSON object")
    return value


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(type(size) is int and size >= 0 for size in value):
        raise bad_request(f"{where}: shape must be a list of non-negative integers")
    return value


def _flatten(data: Any) -> list[Any]:
    """The protocol allows nested (row-major) or flat data; DermaSeg's input is one-dimensional anyway."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item))
    return flat


def _split_bytes_elements(raw: bytes, count: int, where: str) -> list[bytes]:
    """A binary BYTES tensor: each element a 4-byte little-endian length and that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise bad_request(f"{where}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise bad_request(f"{where}: a BYTES element says {length} bytes but fewer follow")
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise bad_request(f"{where}: shape says {count} element(s), the binary data holds {len(elements)}")
    return elements


def _json_bytes_elements(data: Any, count: int, where: str) -> list[bytes]:
    """A JSON BYTES tensor: each element a base64 string (JSON cannot carry raw bytes)."""
    flat = _flatten(data)
    if len(flat) != count:
        raise bad_request(f"{where}: shape says {count} element(s), data holds {len(flat)}")
    elements = []
    for item in flat:
        if not isinstance(item, str):
            raise bad_request(f"{where}: a BYTES element in JSON must be a base64 string")
        try:
            elements.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise bad_request(
                f"{where}: a BYTES element in JSON must be base64 (standard alphabet)"
            ) from None
    return elements


def parse_infer_request(body: bytes, header_length: str | None, bytes_inputs: Sequence[str]) -> InferRequest:
    """Parses an inference request in either encoding.

    Args:
        body: the whole HTTP body.
        header_length: the ``Inference-Header-Content-Length`` header, when given.
        bytes_inputs: the inputs the model takes (all BYTES); any other name is refused.

    Raises:
        ServiceError: 400 for malformed JSON, a bad header length, unknown inputs, a wrong datatype,
            inconsistent binary sizes, or data that is neither base64 nor binary.
    """
    if header_length is None:
        json_size = len(body)
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise bad_request(f"{HEADER_LENGTH} must be an integer no larger than the body")
        json_size = int(header_length)
    try:
        document = json.loads(body[:json_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the inference request is not valid JSON: {error}") from None
    request = _object(document, "the inference request")
    binary = memoryview(body)[json_size:]
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("id must be a string")
    parameters = _object(request.get("parameters"), "parameters")

    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad_request("inputs must be a non-empty list", "missing_input")
    inputs: dict[str, list[bytes]] = {}
    shapes: dict[str, list[int]] = {}
    offset = 0
    for position, raw_input in enumerate(raw_inputs):
        tensor = _object(raw_input, f"inputs[{position}]")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise bad_request(f"inputs[{position}]: name must be a string")
        where = f"input {name!r}"
        if name not in bytes_inputs:
            raise bad_request(f"unknown input {name!r}: the model takes {', '.join(bytes_inputs)}")
        if name in inputs:
            raise bad_request(f"{where} is given twice")
        datatype = tensor.get("datatype")
        if datatype != "BYTES":
            raise bad_request(f"{where}: datatype must be BYTES (one encoded photo), not {datatype!r}")
        shape = _shape(tensor.get("shape"), where)
        count = int(np.prod(shape)) if shape else 1
        tensor_parameters = _object(tensor.get("parameters"), f"{where}: parameters")
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise bad_request(f"{where}: binary_data_size does not fit the binary data after the JSON")
            inputs[name] = _split_bytes_elements(bytes(binary[offset : offset + size]), count, where)
            offset += size
        elif "data" in tensor:
            inputs[name] = _json_bytes_elements(tensor["data"], count, where)
        else:
            raise bad_request(f"{where}: no data (neither JSON data nor binary_data_size)")
        shapes[name] = shape
    if offset != len(binary):
        raise bad_request(f"{len(binary) - offset} byte(s) after the JSON belong to no input")

    outputs = None
    if "outputs" in request:
        raw_outputs = request["outputs"]
        if not isinstance(raw_outputs, list):
            raise bad_request("outputs must be a list")
        outputs = []
        for position, raw_output in enumerate(raw_outputs):
            tensor = _object(raw_output, f"outputs[{position}]")
            name = tensor.get("name")
            if not isinstance(name, str):
                raise bad_request(f"outputs[{position}]: name must be a string")
            wanted = _object(tensor.get("parameters"), f"output {name!r}: parameters").get("binary_data")
            if wanted is not None and not isinstance(wanted, bool):
                raise bad_request(f"output {name!r}: binary_data must be true or false")
            outputs.append(RequestedOutput(name, wanted))
    return InferRequest(request_id, parameters, inputs, outputs, shapes)


# --- responses ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """An output tensor: its name and values (the datatype follows the numpy dtype)."""

    name: str
    array: np.ndarray

    @property
    def datatype(self) -> str:
        for name, dtype in DATATYPES.items():
            if self.array.dtype == dtype:
                return name
        raise TypeError(f"{self.name}: no protocol datatype for {self.array.dtype}")


def _json_data(array: np.ndarray) -> str:
    flat = array.ravel()
    if array.dtype == np.uint8:
        return "[" + ",".join(_UINT8_TEXT[flat]) + "]"
    return json.dumps(flat.tolist(), separators=(",", ":"))


def encode_infer_response(
    header: Mapping[str, Any], tensors: Sequence[Tensor], binary: Mapping[str, bool]
) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON object's length when binary data follows it (else None).

    Args:
        header: the answer's fields but ``outputs`` (model_name, model_version, id, parameters).
        tensors: the outputs, in the order to list them.
        binary: which outputs go as binary data, by name.
    """
    pieces: list[str] = []
    blobs: list[bytes] = []
    for tensor in tensors:
        described: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.array.shape),
        }
        if binary.get(tensor.name, False):
            blob = np.ascontiguousarray(tensor.array, dtype=DATATYPES[tensor.datatype]).tobytes()
            blobs.append(blob)
            described["parameters"] = {"binary_data_size": len(blob)}
            pieces.append(json.dumps(described, separators=(",", ":")))
        else:
            opened = json.dumps(described, separators=(",", ":"))[:-1]
            pieces.append(f'{opened},"data":{_json_data(tensor.array)}}}')
    fields = {key: value for key, value in header.items() if value is not None}
    opened = json.dumps(fields, separators=(",", ":"))[:-1]
    text = f'{opened}{"," if len(opened) > 1 else ""}"outputs":[{",".join(pieces)}]}}'
    document = text.encode()
    if not blobs:
        return document, None
    return document + b"".join(blobs), len(document)

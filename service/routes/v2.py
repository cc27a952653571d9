"""The Open Inference Protocol (KServe V2 / Triton HTTP) beside ``/segment``: health, metadata and infer.

The model is served as ``dermaseg`` (the name ``dermaseg export --triton`` gives it). Its input ``image`` is
one encoded photo (``BYTES``, shape ``[1]``); its outputs are ``mask`` (UINT8 ``[1, H, W]``, 1 = lesion),
``probability`` (UINT8 ``[1, H, W]``, round(p × 255): the pixels of /segment's probability PNG) and
``area_px`` (INT64 ``[1]``), at the photo's own size. Request ``parameters`` carry /segment's options.

The same machinery as /segment: the byte limit and upload deadline, API keys, inference slots (503 with
Retry-After when saturated), request ids, metrics, the access log and the very same segmentation core.
Errors have the protocol's shape, ``{"error": "...", "code": "..."}`` (see :class:`V2Route`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Annotated, Any

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError

from service import oip
from service.errors import ServiceError
from service.imaging import probability_to_uint8
from service.observability import Metrics, request_state
from service.pipeline import Pipeline, Segmentation
from service.routes.deps import (
    LimiterDep,
    LoadedModelDep,
    MetricsDep,
    PipelineDep,
    ServedModel,
    ServedModelDep,
    SettingsDep,
    require_api_key,
)
from service.routes.segment import run_pipeline
from service.routes.upload import read_body
from service.schemas import SegmentOptions, SegmentParams

#: The model's name on the protocol's paths (the Triton repository's name too: training.export).
MODEL_NAME = "dermaseg"
INPUT_NAME = "image"
#: The outputs every answer can carry, with their datatype and shape (-1: the photo's height / width).
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "mask": ("UINT8", [1, -1, -1]),
    "probability": ("UINT8", [1, -1, -1]),
    "area_px": ("INT64", [1]),
}
#: Filled when the segmentation carries a quality estimate (``Segmentation.quality``, the review-flag issue).
QUALITY_OUTPUT = "estimated_jaccard"
#: Request parameters read as /segment's options (same names, same ranges: ``SegmentParams``).
OPTION_NAMES = ("threshold", "flip_tta", "largest_component", "fill_holes", "pixel_spacing_mm")
PLATFORM = "dermaseg_onnxruntime"


def v2_error(error: ServiceError) -> JSONResponse:
    """The protocol's error answer for a :class:`ServiceError` (its status and headers kept)."""
    body = oip.V2Error(error=error.message, code=error.code)
    return JSONResponse(body.model_dump(), status_code=error.status_code, headers=error.headers)


class V2Route(APIRoute):
    """A route whose errors, its dependencies' included (API key, slots, readiness), take the V2 shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def v2_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as error:
                return v2_error(error)
            except RequestValidationError as error:
                message = "; ".join(str(item.get("msg", "invalid")) for item in error.errors())
                return v2_error(ServiceError(400, "validation_error", message or "invalid request"))

        return v2_handler


router = APIRouter(prefix="/v2", tags=["open inference protocol"], route_class=V2Route)


def _error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    return {"model": oip.V2Error, "description": description, **({"headers": headers} if headers else {})}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
_UNAUTHORIZED = _error("unauthorized: API keys are configured and none valid was given.")
_NOT_FOUND = _error("unknown_model: no such model or version here (the model is dermaseg).")
_NOT_READY = _error("not_ready: the model is still loading.", **_RETRY_AFTER)


def _model_name(request: Request) -> str:
    return str(request.path_params["model_name"])


def _model_version(request: Request) -> str:
    return str(request.path_params["model_version"])


# Read from the path by hand and declared below: a path parameter FastAPI validates would add a 422 to the
# contract that the protocol never answers (a wrong name or version is a 404 here).
ModelName = Annotated[str, Depends(_model_name)]
ModelVersion = Annotated[str, Depends(_model_version)]
_NAME_PARAMETER = {
    "name": "model_name",
    "in": "path",
    "required": True,
    "description": "The model's name: dermaseg.",
    "schema": {"type": "string", "enum": [MODEL_NAME]},
}
_VERSION_PARAMETER = {
    "name": "model_version",
    "in": "path",
    "required": True,
    "description": "The served model's version (GET /v2/models/dermaseg lists it).",
    "schema": {"type": "string"},
}
_NAMED: dict[str, Any] = {"parameters": [_NAME_PARAMETER]}
_VERSIONED: dict[str, Any] = {"parameters": [_NAME_PARAMETER, _VERSION_PARAMETER]}


def _check_model(served: ServedModel | None, model_name: str, model_version: str | None) -> None:
    if model_name != MODEL_NAME:
        raise ServiceError(
            404, "unknown_model", f"unknown model {model_name!r}: this server has {MODEL_NAME!r}"
        )
    if model_version is not None and served is not None and model_version != served.info.version:
        raise ServiceError(
            404,
            "unknown_model",
            f"unknown version {model_version!r} of {MODEL_NAME}: it is {served.info.version}",
        )


def _served(request: Request) -> ServedModel | None:
    served: ServedModel | None = getattr(request.app.state, "served", None)
    return served


def _is_ready(request: Request) -> bool:
    return _served(request) is not None and request.app.state.not_ready_reason is None


# --- server -------------------------------------------------------------------------------------------------


@router.get("", operation_id="v2_server_metadata", response_model=oip.ServerMetadata)
async def server_metadata(request: Request) -> oip.ServerMetadata:
    """Server metadata: name, version and the protocol extensions implemented."""
    return oip.ServerMetadata(name="dermaseg", version=request.app.version, extensions=[oip.BINARY_EXTENSION])


@router.get("/health/live", operation_id="v2_health_live", response_model=oip.ServerLive)
async def health_live() -> oip.ServerLive:
    """The process is up and answering (as /health/live)."""
    return oip.ServerLive(live=True)


_HEALTH_FALSE = "Not ready (the protocol answers false with a 4xx): loading, warming up, shutting down, or a "
_HEALTH_FALSE += "required provider is not in use. /health/ready says why."


@router.get(
    "/health/ready",
    operation_id="v2_health_ready",
    response_model=oip.ServerReady,
    responses={400: {"model": oip.ServerReady, "description": _HEALTH_FALSE}},
)
async def health_ready(request: Request) -> JSONResponse:
    """The model is loaded, warmed up and on the providers asked for (as /health/ready)."""
    ready = _is_ready(request)
    return JSONResponse(oip.ServerReady(ready=ready).model_dump(), status_code=200 if ready else 400)


# --- model metadata and readiness ---------------------------------------------------------------------------


def available_outputs(pipeline: Pipeline) -> dict[str, tuple[str, list[int]]]:
    """:data:`OUTPUTS`, and ``estimated_jaccard`` (FP32 ``[1]``) when the model has a quality estimator."""
    if pipeline.quality is None:
        return dict(OUTPUTS)
    return {**OUTPUTS, QUALITY_OUTPUT: ("FP32", [1])}


def _metadata(served: ServedModel) -> oip.ModelMetadata:
    outputs = [
        oip.TensorMetadata(name=name, datatype=kind, shape=shape)
        for name, (kind, shape) in available_outputs(served.pipeline).items()
    ]
    return oip.ModelMetadata(
        name=MODEL_NAME,
        versions=[served.info.version],
        platform=PLATFORM,
        inputs=[oip.TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[1])],
        outputs=outputs,
    )


_METADATA_RESPONSES: dict[int | str, dict[str, Any]] = {401: _UNAUTHORIZED, 404: _NOT_FOUND, 503: _NOT_READY}


@router.get(
    "/models/{model_name}",
    operation_id="v2_model_metadata",
    openapi_extra=_NAMED,
    response_model=oip.ModelMetadata,
    responses=_METADATA_RESPONSES,
    dependencies=[Depends(require_api_key)],
)
async def model_metadata(model_name: ModelName, served: LoadedModelDep) -> oip.ModelMetadata:
    """The model's metadata: versions, platform, inputs and outputs."""
    _check_model(served, model_name, None)
    return _metadata(served)


@router.get(
    "/models/{model_name}/versions/{model_version}",
    operation_id="v2_model_version_metadata",
    openapi_extra=_VERSIONED,
    response_model=oip.ModelMetadata,
    responses=_METADATA_RESPONSES,
    dependencies=[Depends(require_api_key)],
)
async def model_version_metadata(
    model_name: ModelName, model_version: ModelVersion, served: LoadedModelDep
) -> oip.ModelMetadata:
    """The metadata of one version of the model (the served one)."""
    _check_model(served, model_name, model_version)
    return _metadata(served)


_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": oip.ModelReady, "description": _HEALTH_FALSE},
    404: _NOT_FOUND,
}


def _model_ready(request: Request, model_name: str, model_version: str | None) -> JSONResponse:
    _check_model(_served(request), model_name, model_version)
    ready = _is_ready(request)
    body = oip.ModelReady(name=MODEL_NAME, ready=ready)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 400)


@router.get(
    "/models/{model_name}/ready",
    operation_id="v2_model_ready",
    openapi_extra=_NAMED,
    response_model=oip.ModelReady,
    responses=_READY_RESPONSES,
)
async def model_ready(request: Request, model_name: ModelName) -> JSONResponse:
    """Whether the model may serve (as /health/ready)."""
    return _model_ready(request, model_name, None)


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    operation_id="v2_model_version_ready",
    openapi_extra=_VERSIONED,
    response_model=oip.ModelReady,
    responses=_READY_RESPONSES,
)
async def model_version_ready(
    request: Request, model_name: ModelName, model_version: ModelVersion
) -> JSONResponse:
    """Whether this version of the model may serve."""
    return _model_ready(request, model_name, model_version)


# --- infer --------------------------------------------------------------------------------------------------


def run_segmentation(
    pipeline: Pipeline, photo: bytes, options: SegmentOptions, *, max_pixels: int, metrics: Metrics
) -> tuple[Segmentation, dict[str, float]]:
    """The one call into the segmentation core, the very one /segment runs (decode … postprocess, timed).

    Nothing is PNG-encoded here. A photo of a format the service does not read is a 400 in this protocol
    (/segment says 415).
    """
    try:
        outcome = run_pipeline(
            pipeline, photo, options, max_pixels=max_pixels, mask=False, probability=False, metrics=metrics
        )
    except ServiceError as error:
        if error.status_code == 415:
            raise ServiceError(400, error.code, error.message, error.headers) from None
        raise
    timings = {name: value for name, value in outcome.times.ms.items() if name != "encode"}
    return outcome.segmentation, timings


def _quality(segmentation: Segmentation) -> float | None:
    """The estimated Jaccard when the core gives one (the model has a quality estimator), else None."""
    return None if segmentation.quality is None else segmentation.quality.estimated_jaccard


def output_tensors(segmentation: Segmentation, names: list[str]) -> list[oip.Tensor]:
    """The outputs asked for, in the order asked, computed only when asked."""
    makers: dict[str, Callable[[], np.ndarray]] = {
        "mask": lambda: segmentation.mask.astype(np.uint8)[np.newaxis],
        "probability": lambda: probability_to_uint8(segmentation.probability)[np.newaxis],
        "area_px": lambda: np.array([segmentation.area_px], dtype=np.int64),
        QUALITY_OUTPUT: lambda: np.array([_quality(segmentation)], dtype=np.float32),
    }
    return [oip.Tensor(name, makers[name]()) for name in names]


def _photo(request: oip.InferRequest) -> bytes:
    elements = request.inputs.get(INPUT_NAME)
    if elements is None:
        raise oip.bad_request(f"missing input {INPUT_NAME!r} (BYTES, shape [1])", "missing_input")
    if request.shapes[INPUT_NAME] != [1] or len(elements) != 1:
        raise oip.bad_request(
            f"input {INPUT_NAME!r}: shape must be [1] (one photo a request), not {request.shapes[INPUT_NAME]}"
        )
    return elements[0]


def _options(parameters: dict[str, Any], served: ServedModel) -> tuple[SegmentOptions, bool]:
    """/segment's options from the request parameters (strict types, same ranges), and binary_data_output."""
    given = {name: parameters[name] for name in OPTION_NAMES if name in parameters}
    try:
        params = SegmentParams.model_validate(given, strict=True)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise oip.bad_request(f"parameters: {problems}") from None
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise oip.bad_request("parameters: binary_data_output must be true or false")
    options = params.options(served.info.threshold)
    return options, binary_output


def _outputs(
    request: oip.InferRequest, binary_default: bool, available: Iterable[str]
) -> tuple[list[str], dict[str, bool]]:
    """The outputs to send (each once, in the order asked; all ``available`` by default), binary or not."""
    known = [*OUTPUTS, QUALITY_OUTPUT]
    if request.outputs is None:
        return list(available), dict.fromkeys(available, binary_default)
    names: list[str] = []
    binary: dict[str, bool] = {}
    for output in request.outputs:
        if output.name not in known:
            raise oip.bad_request(f"unknown output {output.name!r}: the model has {', '.join(OUTPUTS)}")
        if output.name not in binary:
            names.append(output.name)
            binary[output.name] = binary_default if output.binary is None else output.binary
    return names, binary


_INFER_BODY: dict[str, Any] = {
    "required": True,
    "description": "The JSON form (base64 photo). With the binary tensor extension the body is this JSON "
    "object "
    "(Inference-Header-Content-Length bytes, its input with parameters.binary_data_size instead of data) "
    "followed by the photo as a BYTES element: its 4-byte little-endian length, then its bytes.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {
                        "type": "object",
                        "properties": {
                            **{
                                name: schema
                                for name, schema in SegmentParams.model_json_schema()["properties"].items()
                                if name in OPTION_NAMES
                            },
                            "binary_data_output": {"type": "boolean"},
                        },
                    },
                    "inputs": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "datatype", "shape", "data"],
                            "properties": {
                                "name": {"const": INPUT_NAME},
                                "datatype": {"const": "BYTES"},
                                "shape": {
                                    "type": "array",
                                    "items": {"const": 1},
                                    "minItems": 1,
                                    "maxItems": 1,
                                },
                                "data": {
                                    "type": "array",
                                    "minItems": 1,
                                    "maxItems": 1,
                                    "items": {"type": "string", "format": "byte"},
                                    "description": "The photo (JPEG, PNG, BMP or TIFF), base64-encoded.",
                                },
                            },
                        },
                    },
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"enum": [*OUTPUTS, QUALITY_OUTPUT]},
                                "parameters": {
                                    "type": "object",
                                    "properties": {"binary_data": {"type": "boolean"}},
                                },
                            },
                        },
                    },
                },
            }
        }
    },
}

_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The outputs: JSON, or with binary outputs the JSON object followed by their bytes "
        "(application/octet-stream, Inference-Header-Content-Length giving the JSON's length).",
        "content": {oip.BINARY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            oip.HEADER_LENGTH: {
                "description": "Binary answers: the length of the JSON object that opens the body.",
                "schema": {"type": "integer"},
            },
            "Server-Timing": {"description": "Where the time went (ms).", "schema": {"type": "string"}},
        },
    },
    400: _error(
        "invalid_inference_request / missing_input: malformed request, wrong datatype or shape, no image; "
        "undecodable_image / unsupported_media_type: the bytes are not a photo the service reads."
    ),
    401: _UNAUTHORIZED,
    404: _NOT_FOUND,
    408: _error("request_timeout: the body did not arrive in time (connection closed)."),
    413: _error("payload_too_large: over the byte limit; image_too_large: over the pixel limit."),
    503: _error("overloaded: too many requests waiting; not_ready: the model is not ready.", **_RETRY_AFTER),
}


async def _infer(
    request: Request,
    model_name: str,
    model_version: str | None,
    served: ServedModel,
    pipeline: Pipeline,
    settings: SettingsDep,
    limiter: LimiterDep,
    metrics: Metrics,
) -> Response:
    _check_model(served, model_name, model_version)
    state = request_state(request.scope)
    started = float(state.get("started_at", time.perf_counter()))
    body = await read_body(request, settings.max_upload_bytes, timeout_s=settings.upload_timeout_s)
    parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH), (INPUT_NAME,))
    photo = _photo(parsed)
    options, binary_default = _options(parsed.parameters, served)
    names, binary = _outputs(parsed, binary_default, available_outputs(pipeline))
    received = time.perf_counter()

    def work() -> tuple[bytes, int | None, dict[str, float]]:
        segmentation, timings = run_segmentation(
            pipeline, photo, options, max_pixels=settings.max_pixels, metrics=metrics
        )
        clock = time.perf_counter()
        if QUALITY_OUTPUT in names and _quality(segmentation) is None:
            raise oip.bad_request(f"{QUALITY_OUTPUT} is not available from this model")
        extra: dict[str, Any] = {"threshold": options.threshold, "lesion_found": segmentation.found}
        area_mm2 = segmentation.area_mm2(options.pixel_spacing_mm)
        if area_mm2 is not None:
            extra["area_mm2"] = area_mm2
        header = {
            "model_name": MODEL_NAME,
            "model_version": served.info.version,
            "id": parsed.id,
            "parameters": extra,
        }
        content, json_length = oip.encode_infer_response(header, output_tensors(segmentation, names), binary)
        timings["encode"] = (time.perf_counter() - clock) * 1000.0
        return content, json_length, timings

    async with limiter.slot():
        slotted = time.perf_counter()
        content, json_length, work_timings = await anyio.to_thread.run_sync(work)
    timings = {"receive": (received - started) * 1000.0, "queue": (slotted - received) * 1000.0}
    timings.update(work_timings)
    timings["total"] = (time.perf_counter() - started) * 1000.0
    state["timings"] = {name: round(value, 2) for name, value in timings.items()}
    headers = {
        "Server-Timing": ", ".join(f"{name};dur={value:.1f}" for name, value in state["timings"].items())
    }
    if json_length is None:
        return Response(content, media_type=oip.JSON_MEDIA_TYPE, headers=headers)
    headers[oip.HEADER_LENGTH] = str(json_length)
    return Response(content, media_type=oip.BINARY_MEDIA_TYPE, headers=headers)


@router.post(
    "/models/{model_name}/infer",
    operation_id="v2_infer",
    response_model=oip.InferResponse,
    responses=_INFER_RESPONSES,
    openapi_extra={"requestBody": _INFER_BODY, **_NAMED},
    dependencies=[Depends(require_api_key)],
)
async def infer(
    request: Request,
    model_name: ModelName,
    served: ServedModelDep,
    pipeline: PipelineDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
) -> Response:
    """Segment one photo (input image: BYTES [1]); outputs mask, probability and area_px."""
    return await _infer(request, model_name, None, served, pipeline, settings, limiter, metrics)


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    operation_id="v2_model_version_infer",
    response_model=oip.InferResponse,
    responses=_INFER_RESPONSES,
    openapi_extra={"requestBody": _INFER_BODY, **_VERSIONED},
    dependencies=[Depends(require_api_key)],
)
async def infer_version(
    request: Request,
    model_name: ModelName,
    model_version: ModelVersion,
    served: ServedModelDep,
    pipeline: PipelineDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
) -> Response:
    """Segment one photo with this version of the model (the served one)."""
    return await _infer(request, model_name, model_version, served, pipeline, settings, limiter, metrics)

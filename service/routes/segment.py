"""``POST /segment``: a photo in, the lesion's mask, probability map and measurements out.

upload (in memory, size-capped) → inference slot (bounded; 503 when saturated) → in a worker thread:
decode → preprocess → ONNX Runtime → postprocess → PNG encode. The event loop never decodes or infers.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service.errors import ServiceError
from service.imaging import ImageDecodeError, decode_image, encode_png
from service.inference import Segmentation, Segmenter, postprocess, preprocess
from service.observability import Metrics, request_state
from service.routes.deps import (
    LimiterDep,
    MetricsDep,
    SegmenterDep,
    ServedModelDep,
    SettingsDep,
    require_api_key,
)
from service.routes.upload import read_upload
from service.schemas import (
    BoundingBox,
    ErrorResponse,
    ImageSize,
    Lesion,
    ModelRef,
    SegmentOptions,
    SegmentParams,
    SegmentResponse,
    Timings,
)

router = APIRouter(tags=["segmentation"], dependencies=[Depends(require_api_key)])

FILE_FIELD = "file"
OUTPUT_NAMES = ("mask", "probability")
#: Form fields read as options (by their wire names).
OPTION_FIELDS = frozenset(field.alias or name for name, field in SegmentParams.model_fields.items())


def _form_field_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An option's schema as a form field: its query parameter's, without the null branch and default."""
    branches = [branch for branch in schema.get("anyOf", [schema]) if branch.get("type") != "null"]
    (value,) = branches
    kept = {key: item for key, item in value.items() if key not in ("default", "title")}
    return {**kept, "description": f"Instead of the query parameter {name}: {schema.get('description', '')}"}


_PARAM_SCHEMAS: dict[str, Any] = SegmentParams.model_json_schema(by_alias=True)["properties"]

_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FILE_FIELD],
                "properties": {
                    FILE_FIELD: {
                        "type": "string",
                        "format": "binary",
                        "description": "The photo: JPEG, PNG, BMP or TIFF (EXIF orientation is applied).",
                    },
                    **{name: _form_field_schema(name, schema) for name, schema in _PARAM_SCHEMAS.items()},
                },
            }
        }
    },
}


def _header(description: str, schema_type: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": schema_type}}


#: Every answer carries its request id (service.observability).
_REQUEST_ID = {"X-Request-ID": _header("The request's id (the client's own when it sent a safe one).")}


def _error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description, "headers": {**_REQUEST_ID, **headers}}


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The segmentation as JSON; with format=png or Accept: image/png, the mask as PNG.",
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            **_REQUEST_ID,
            "Server-Timing": _header("Where the time went: receive, queue, decode, … total (ms)."),
            "X-Lesion-Found": _header("PNG answers only: true or false."),
            "X-Lesion-Area-Px": _header("PNG answers only: the lesion's area in pixels.", "integer"),
            "X-Model": _header("PNG answers only: the model's name/version."),
        },
    },
    400: _error("undecodable_image: the bytes are not a readable image; malformed_request: bad multipart."),
    401: _error(
        "unauthorized: API keys are configured and none valid was given.",
        **{"WWW-Authenticate": _header('Bearer realm="dermaseg"')},
    ),
    408: _error("request_timeout: the upload did not arrive within the time allowed (connection closed)."),
    413: _error("payload_too_large: over the byte limit; image_too_large: over the pixel limit."),
    415: _error("unsupported_media_type: not JPEG, PNG, BMP or TIFF, or the request is not multipart."),
    422: _error("validation_error: the file field is missing or given twice, or an option is out of range."),
    500: _error("internal_error: an unexpected failure (details are in the server log only)."),
    503: _error(
        "overloaded: too many requests waiting; not_ready: the model is not ready. Retry after the delay.",
        **{"Retry-After": _header("Seconds to wait before retrying.", "integer")},
    ),
}


@dataclass
class _Outcome:
    """What the worker thread hands back to the route."""

    segmentation: Segmentation
    height: int
    width: int
    mask_png: bytes | None
    mask_base64: str | None
    probability_base64: str | None
    timings: dict[str, float] = field(default_factory=dict)


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode("ascii") if png is not None else None


def probability_to_uint8(probability: np.ndarray) -> np.ndarray:
    """The confidence map's pixels: round(probability × 255) as uint8."""
    pixels: np.ndarray = np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)
    return pixels


def _segment_photo(
    segmenter: Segmenter,
    data: bytes,
    *,
    max_pixels: int,
    options: SegmentOptions,
    want_mask: bool,
    want_probability: bool,
    base64_encode: bool,
    metrics: Metrics,
    png_compress_level: int,
) -> _Outcome:
    """Decode → preprocess → session → postprocess → encode, timing each step (runs in a worker thread)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = (now - clock) * 1000.0
        clock = now

    try:
        rgb = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise ServiceError.from_decode_error(error) from None
    lap("decode")
    # The same three steps as Segmenter.segment, taken one by one so that the session is timed alone.
    batch = preprocess(rgb, segmenter.input_size)[np.newaxis]
    lap("preprocess")
    probabilities = segmenter.probabilities(batch, flip_tta=options.flip_tta)
    lap("inference")
    metrics.inference_latency.observe(timings["inference"] / 1000.0)
    height, width = rgb.shape[:2]
    segmentation = postprocess(
        probabilities[0],
        (height, width),
        options.threshold,
        largest_component=options.largest_component,
        fill_holes=options.fill_holes,
    )
    lap("postprocess")
    mask_png = encode_png(segmentation.mask, png_compress_level) if want_mask else None
    probability_png = (
        encode_png(probability_to_uint8(segmentation.probability), png_compress_level)
        if want_probability
        else None
    )
    mask_base64 = _b64(mask_png) if base64_encode else None
    probability_base64 = _b64(probability_png) if base64_encode else None
    lap("encode")
    return _Outcome(segmentation, height, width, mask_png, mask_base64, probability_base64, timings)


def _quality(accept: str, media_type: str) -> float:
    """The q-value ``accept`` gives ``media_type`` (most specific matching range wins; 0 when none)."""
    best_specificity, best_q = -1, 0.0
    main_type = media_type.split("/")[0]
    for item in accept.split(","):
        media, *params = (piece.strip() for piece in item.split(";"))
        media = media.lower()
        if media == media_type:
            specificity = 2
        elif media == f"{main_type}/*":
            specificity = 1
        elif media == "*/*":
            specificity = 0
        else:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if specificity > best_specificity:
            best_specificity, best_q = specificity, q
    return best_q


def wants_png(response_format: str | None, accept: str | None) -> bool:
    """``format`` decides when given; otherwise PNG only when Accept prefers image/png to JSON."""
    if response_format is not None:
        return response_format == "png"
    if not accept:
        return False
    return _quality(accept, "image/png") > _quality(accept, "application/json")


def _with_form_fields(query: SegmentParams, fields: dict[str, str]) -> SegmentParams:
    """The query's options with those sent as form fields; 422 for a clash or an invalid value."""
    if not fields:
        return query
    given = query.model_dump(by_alias=True, exclude_unset=True)
    clashes = sorted(set(given) & set(fields))
    if clashes:
        raise ServiceError(
            422, "validation_error", f"{', '.join(clashes)}: given both in the query and as form fields"
        )
    try:
        return SegmentParams.model_validate({**given, **fields})
    except ValidationError as error:
        raise RequestValidationError(
            [{**item, "loc": ("form", *item["loc"])} for item in error.errors(include_url=False)]
        ) from None


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={value:.1f}" for name, value in timings.items())


@router.post(
    "/segment",
    operation_id="segment",
    response_model=SegmentResponse,
    responses=_RESPONSES,
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def segment(
    request: Request,
    served: ServedModelDep,
    segmenter: SegmenterDep,
    settings: SettingsDep,
    limiter: LimiterDep,
    metrics: MetricsDep,
    query: Annotated[SegmentParams, Query()],
) -> Response:
    """Segment the lesion in an uploaded photo.

    The options may also come as form fields beside the file; an option given both ways is refused.
    """
    state = request_state(request.scope)
    started = float(state.get("started_at", time.perf_counter()))
    upload = await read_upload(
        request, FILE_FIELD, settings.max_upload_bytes, OPTION_FIELDS, timeout_s=settings.upload_timeout_s
    )
    params = _with_form_fields(query, upload.fields)
    png_only = wants_png(params.response_format, request.headers.get("accept"))
    wanted = {name for name in params.outputs.split(",") if name}
    options = SegmentOptions(
        threshold=served.info.threshold if params.threshold is None else params.threshold,
        flip_tta=params.flip_tta,
        largest_component=params.largest_component,
        fill_holes=params.fill_holes,
        pixel_spacing_mm=params.pixel_spacing_mm,
    )
    received = time.perf_counter()
    async with limiter.slot():
        slotted = time.perf_counter()
        outcome = await anyio.to_thread.run_sync(
            lambda: _segment_photo(
                segmenter,
                upload.data,
                max_pixels=settings.max_pixels,
                options=options,
                want_mask=png_only or "mask" in wanted,
                want_probability=not png_only and "probability" in wanted,
                base64_encode=not png_only,
                metrics=metrics,
                png_compress_level=settings.png_compress_level,
            )
        )
    timings = {"receive": (received - started) * 1000.0, "queue": (slotted - received) * 1000.0}
    timings.update(outcome.timings)
    timings["total"] = (time.perf_counter() - started) * 1000.0
    timings = {name: round(value, 2) for name, value in timings.items()}
    state["timings"] = timings
    segmentation = outcome.segmentation
    headers = {"Server-Timing": _server_timing(timings)}

    if png_only:
        assert outcome.mask_png is not None
        headers.update(
            {
                "X-Lesion-Found": "true" if segmentation.found else "false",
                "X-Lesion-Area-Px": str(segmentation.area_px),
                "X-Model": f"{served.info.name}/{served.info.version}",
            }
        )
        return Response(outcome.mask_png, media_type="image/png", headers=headers)

    bbox = segmentation.bbox
    body = SegmentResponse(
        request_id=str(state.get("request_id", "")),
        model=ModelRef(name=served.info.name, version=served.info.version),
        image=ImageSize(width=outcome.width, height=outcome.height),
        options=options,
        lesion=Lesion(
            found=segmentation.found,
            area_px=segmentation.area_px,
            area_fraction=segmentation.area_fraction,
            area_mm2=segmentation.area_mm2(params.pixel_spacing_mm),
            bbox=BoundingBox(x=bbox[0], y=bbox[1], width=bbox[2], height=bbox[3]) if bbox else None,
        ),
        mask_png=outcome.mask_base64,
        probability_png=outcome.probability_base64,
        timings_ms=Timings(**timings),
    )
    return JSONResponse(body.model_dump(mode="json"), headers=headers)

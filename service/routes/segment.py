"""``POST /segment``: a photo in, the lesion's mask, probability map and measurements out.

upload (in memory, size-capped) → inference slot (bounded; 503 when saturated) → in a worker thread, the
pipeline (service.pipeline): decode → preprocess → ONNX Runtime → postprocess → PNG encode, each step
timed. The event loop never decodes or infers.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service.errors import ServiceError
from service.imaging import ImageDecodeError
from service.observability import Metrics, request_state
from service.pipeline import PhotoResult, Pipeline
from service.routes.deps import (
    LimiterDep,
    MetricsDep,
    PipelineDep,
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
    Quality,
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
            "X-Lesion-Estimated-Jaccard": _header(
                "PNG answers only: the outline's estimated Jaccard (0–1; absent without an estimator).",
                "number",
            ),
            "X-Lesion-Review": _header(
                "PNG answers only: true when review is recommended, then the reasons after a semicolon "
                "(e.g. true; low_confidence,lesion_touches_border)."
            ),
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


def _b64(png: bytes | None) -> str | None:
    return base64.b64encode(png).decode("ascii") if png is not None else None


def run_pipeline(
    pipeline: Pipeline,
    data: bytes,
    options: SegmentOptions,
    *,
    max_pixels: int,
    mask: bool,
    probability: bool,
    metrics: Metrics,
) -> PhotoResult:
    """The pipeline on one upload, in a worker thread: decode errors become 4xx, the session is timed.

    Shared by ``POST /segment`` and the V2 inference route.
    """
    try:
        result = pipeline.run(
            data,
            options.threshold,
            flip_tta=options.flip_tta,
            largest_component=options.largest_component,
            fill_holes=options.fill_holes,
            mask=mask,
            probability=probability,
            max_pixels=max_pixels,
        )
    except ImageDecodeError as error:
        raise ServiceError.from_decode_error(error) from None
    metrics.inference_latency.observe(result.times.ms["inference"] / 1000.0)
    metrics.observe_quality(result.segmentation.quality)
    return result


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
    pipeline: PipelineDep,
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
    options = params.options(served.info.threshold)
    received = time.perf_counter()
    async with limiter.slot():
        slotted = time.perf_counter()
        outcome = await anyio.to_thread.run_sync(
            lambda: run_pipeline(
                pipeline,
                upload.data,
                options,
                max_pixels=settings.max_pixels,
                mask=png_only or "mask" in wanted,
                probability=not png_only and "probability" in wanted,
                metrics=metrics,
            )
        )
    timings = {"receive": (received - started) * 1000.0, "queue": (slotted - received) * 1000.0}
    timings.update(outcome.times.ms)
    timings["total"] = (time.perf_counter() - started) * 1000.0
    timings = {name: round(value, 2) for name, value in timings.items()}
    state["timings"] = timings
    segmentation = outcome.segmentation
    headers = {"Server-Timing": _server_timing(timings)}

    if png_only:
        assert outcome.encoded.mask_png is not None
        headers.update(
            {
                "X-Lesion-Found": "true" if segmentation.found else "false",
                "X-Lesion-Area-Px": str(segmentation.area_px),
                "X-Model": f"{served.info.name}/{served.info.version}",
            }
        )
        quality = segmentation.quality
        if quality is not None:
            review = "true" if quality.review_recommended else "false"
            if quality.reasons:
                review += "; " + ",".join(quality.reasons)
            headers["X-Lesion-Estimated-Jaccard"] = f"{quality.estimated_jaccard:.4f}"
            headers["X-Lesion-Review"] = review
        return Response(outcome.encoded.mask_png, media_type="image/png", headers=headers)

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
        quality=Quality(**segmentation.quality.as_dict()) if segmentation.quality else None,
        mask_png=_b64(outcome.encoded.mask_png),
        probability_png=_b64(outcome.encoded.probability_png),
        timings_ms=Timings(**timings),
    )
    return JSONResponse(body.model_dump(mode="json"), headers=headers)

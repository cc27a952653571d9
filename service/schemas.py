"""Response models of the HTTP API (they are the OpenAPI contract; examples included)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Where the served model card comes from: the sidecar NAME.json beside the model, or the ONNX file itself.
CardSource = Literal["sidecar", "embedded"]

#: Example values used in the OpenAPI document.
_EXAMPLE_MODEL: dict[str, Any] = {"name": "dermaseg-resnet50v2-unet", "version": "2.3.0"}
_EXAMPLE_PROVIDERS: list[Any] = ["CPUExecutionProvider"]


class ErrorDetail(BaseModel):
    """What went wrong: a stable machine-readable code and a message for people."""

    code: str = Field(description="Stable machine-readable reason, e.g. undecodable_image.")
    message: str = Field(description="Human-readable explanation.")


class ErrorResponse(BaseModel):
    """The shape of every error answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": {"code": "undecodable_image", "message": "upload: not a readable image"}}]
        }
    )

    error: ErrorDetail


class ModelRef(BaseModel):
    """Which model answered."""

    name: str
    version: str


class ImageSize(BaseModel):
    """Size of the uploaded image in pixels (after EXIF orientation)."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)


class BoundingBox(BaseModel):
    """Axis-aligned box around the lesion, in pixels of the uploaded image (x, y: top-left corner)."""

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)


class Lesion(BaseModel):
    """Measurements of the segmented lesion."""

    found: bool = Field(description="Whether any pixel reached the threshold.")
    area_px: int = Field(ge=0, description="Lesion pixels.")
    area_fraction: float = Field(ge=0.0, le=1.0, description="Lesion pixels / all pixels.")
    area_mm2: float | None = Field(
        default=None, description="Lesion area in mm², when pixel_spacing_mm was given."
    )
    bbox: BoundingBox | None = Field(default=None, description="Box around the lesion; null when none found.")


#: Why an answer is flagged for review (service.quality.REASONS).
QualityReason = Literal[
    "no_lesion_found",
    "lesion_touches_border",
    "low_confidence",
    "fragmented_outline",
    "low_estimated_jaccard",
]


class Quality(BaseModel):
    """How far to trust this outline: the service's estimate of its Jaccard against an expert's outline."""

    estimated_jaccard: float = Field(
        ge=0.0,
        le=1.0,
        description="Estimated Jaccard (intersection over union) of this mask against an expert outline, "
        "from the network's own probability map; calibrated on photos the network never trained on "
        "(docs/quality.md, /v1/model's quality).",
    )
    review_recommended: bool = Field(
        description="True when estimated_jaccard is below the service's review threshold "
        "(DERMASEG_REVIEW_BELOW): have a person check this outline."
    )
    reasons: list[QualityReason] = Field(
        description="With a flagged answer, what looks wrong (empty otherwise): no_lesion_found, "
        "lesion_touches_border, low_confidence, fragmented_outline, or low_estimated_jaccard when none of "
        "the others applies."
    )


class QualityCalibration(BaseModel):
    """How the served quality estimator was calibrated, and how well it did on held-out photos."""

    review_below: float = Field(description="The review threshold in force.")
    calibration: dict[str, Any] = Field(description="Data, split, method and held-out figures of the fit.")


class Timings(BaseModel):
    """Where the time went, in milliseconds."""

    receive: float = Field(description="Reading and parsing the upload.")
    queue: float = Field(description="Waiting for a free inference slot.")
    decode: float = Field(description="Decoding the image.")
    preprocess: float = Field(description="Resizing to the network's input.")
    inference: float = Field(description="The ONNX Runtime session alone (all flips with flip_tta).")
    postprocess: float = Field(description="Resizing back, thresholding and clean-up.")
    encode: float = Field(description="PNG and base64 encoding.")
    total: float = Field(description="From the start of the request to the answer.")


#: The images a JSON answer can carry.
OUTPUTS_PATTERN = r"^((mask|probability)(,(mask|probability))*)?$"


class SegmentParams(BaseModel):
    """The options of ``POST /segment``, as query parameters or as form fields beside the file."""

    model_config = ConfigDict(populate_by_name=True)

    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Probability threshold (default: the model's own)."
    )
    outputs: str = Field(
        default="mask,probability",
        pattern=OUTPUTS_PATTERN,
        description="Comma-separated images to return in the JSON: mask, probability (empty: none).",
    )
    pixel_spacing_mm: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description="Size of one (square) pixel in mm, to report the area in mm².",
    )
    flip_tta: bool = Field(
        default=False, description="Also run the photo mirrored both ways and average (3× the inference)."
    )
    largest_component: bool = Field(default=False, description="Keep only the largest lesion region.")
    fill_holes: bool = Field(default=False, description="Fill holes inside the lesion.")
    response_format: Literal["json", "png"] | None = Field(
        default=None,
        alias="format",
        description="png: answer with the mask's PNG bytes (as Accept: image/png does).",
    )

    def options(self, model_threshold: float) -> SegmentOptions:
        """The options the segmentation runs with: the model's threshold unless one was given."""
        return SegmentOptions(
            threshold=model_threshold if self.threshold is None else self.threshold,
            flip_tta=self.flip_tta,
            largest_component=self.largest_component,
            fill_holes=self.fill_holes,
            pixel_spacing_mm=self.pixel_spacing_mm,
        )


class SegmentOptions(BaseModel):
    """The options the segmentation ran with."""

    threshold: float = Field(ge=0.0, le=1.0)
    flip_tta: bool
    largest_component: bool
    fill_holes: bool
    pixel_spacing_mm: float | None = None


class SegmentResponse(BaseModel):
    """The segmentation of one photo."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "3f2b9c1e5d7a4b8c9e0f1a2b3c4d5e6f",
                    "model": _EXAMPLE_MODEL,
                    "image": {"width": 1024, "height": 768},
                    "options": {
                        "threshold": 0.5,
                        "flip_tta": False,
                        "largest_component": False,
                        "fill_holes": False,
                        "pixel_spacing_mm": 0.02,
                    },
                    "lesion": {
                        "found": True,
                        "area_px": 183204,
                        "area_fraction": 0.233,
                        "area_mm2": 73.28,
                        "bbox": {"x": 301, "y": 190, "width": 512, "height": 430},
                    },
                    "quality": {"estimated_jaccard": 0.87, "review_recommended": False, "reasons": []},
                    "mask_png": "iVBORw0KGgoAAAANSUhEUgAABAAAAAMACAAAAAA...",
                    "probability_png": "iVBORw0KGgoAAAANSUhEUgAABAAAAAMACAAAAAA...",
                    "timings_ms": {
                        "receive": 1.2,
                        "queue": 0.0,
                        "decode": 9.8,
                        "preprocess": 2.1,
                        "inference": 61.0,
                        "postprocess": 8.4,
                        "encode": 14.9,
                        "total": 99.1,
                    },
                }
            ]
        }
    )

    request_id: str = Field(description="Also sent as the X-Request-ID header; quote it when reporting.")
    model: ModelRef
    image: ImageSize
    options: SegmentOptions
    lesion: Lesion
    quality: Quality | None = Field(
        description="The outline's estimated quality and review flag; null only when the served model has "
        "no quality estimator (a custom model that was not calibrated)."
    )
    mask_png: str | None = Field(
        default=None,
        description="Binary mask (0 background, 255 lesion), 8-bit grayscale PNG the size of the upload, "
        "base64. Null unless outputs includes mask.",
    )
    probability_png: str | None = Field(
        default=None,
        description="Lesion probability as an 8-bit grayscale PNG (pixel = round(probability × 255)), the "
        "size of the upload, base64. Null unless outputs includes probability.",
    )
    timings_ms: Timings


class LiveResponse(BaseModel):
    """The process is up."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "alive"}]})

    status: Literal["alive"] = "alive"


class ReadyResponse(BaseModel):
    """Whether the model is loaded, warmed up and running on the providers asked for."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "model": _EXAMPLE_MODEL,
                    "providers": _EXAMPLE_PROVIDERS,
                    "requested_providers": ["cpu"],
                    "fallback": False,
                    "reason": None,
                },
                {
                    "status": "not_ready",
                    "model": _EXAMPLE_MODEL,
                    "providers": _EXAMPLE_PROVIDERS,
                    "requested_providers": ["cuda"],
                    "fallback": True,
                    "reason": "CUDAExecutionProvider was required but the session runs on "
                    "['CPUExecutionProvider']",
                },
            ]
        }
    )

    status: Literal["ready", "not_ready"]
    model: ModelRef | None = None
    providers: list[str] = Field(default_factory=list, description="Providers the session really runs on.")
    requested_providers: list[str] = Field(
        default_factory=list, description="Providers asked for in settings."
    )
    fallback: bool = Field(
        default=False,
        description="The session does not run on the first provider asked for (e.g. cuda asked, CPU in use).",
    )
    reason: str | None = Field(
        default=None, description="Why the service is not ready (e.g. warming up, a required provider)."
    )


class ModelCard(BaseModel):
    """The served model: what it says about itself (ONNX metadata) and how it runs here."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    **_EXAMPLE_MODEL,
                    "input_size": {"width": 224, "height": 224},
                    "threshold": 0.5,
                    "providers": _EXAMPLE_PROVIDERS,
                    "requested_providers": ["cpu"],
                    "sha256": "9b1d…",
                    "card": {
                        "intended_use": "research use, not for diagnosis; non-commercial only "
                        "(trained on ham10000, ph2)",
                        "input": {"dtype": "float32", "layout": "NHWC", "range": [0, 255]},
                    },
                    "card_source": "sidecar",
                    "metadata": {"dermaseg.name": "dermaseg-resnet50v2-unet"},
                }
            ]
        }
    )

    name: str
    version: str
    input_size: ImageSize = Field(description="The network's input; photos are resized to it.")
    threshold: float = Field(description="Default probability threshold.")
    providers: list[str] = Field(description="Providers the session really runs on.")
    requested_providers: list[str]
    sha256: str = Field(description="SHA-256 of the ONNX file (matches the sidecar card).")
    card: dict[str, Any] = Field(
        description="The model card: the sidecar NAME.json beside the model when its sha256 is this file's "
        "(it carries the evaluations made after the export), else the one embedded in the ONNX metadata."
    )
    card_source: CardSource = Field(description="Where `card` comes from.")
    quality: QualityCalibration | None = Field(
        description="The quality estimator behind each answer's `quality`; null when there is none."
    )
    metadata: dict[str, str] = Field(description="Other ONNX metadata_props.")

"""The model card: what the served model says about itself and how it runs here."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service.inference import META_PREFIX
from service.pipeline import Pipeline
from service.routes.deps import LoadedModelDep, require_api_key
from service.schemas import ErrorResponse, ImageSize, ModelCard, QualityCalibration

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(require_api_key)])


def _quality_calibration(pipeline: Pipeline) -> QualityCalibration | None:
    estimator = pipeline.quality
    if estimator is None:
        return None
    review_below = estimator.review_below if pipeline.review_below is None else pipeline.review_below
    return QualityCalibration(review_below=review_below, calibration=dict(estimator.calibration))


@router.get(
    "/model",
    operation_id="get_model",
    response_model=ModelCard,
    responses={
        401: {"model": ErrorResponse, "description": "API keys are configured and none valid was given."},
        503: {"model": ErrorResponse, "description": "not_ready: the model is still loading."},
    },
)
async def get_model(served: LoadedModelDep) -> ModelCard:
    """The served model's card, metadata and execution providers."""
    info = served.info
    height, width = info.input_size
    return ModelCard(
        name=info.name,
        version=info.version,
        input_size=ImageSize(width=width, height=height),
        threshold=info.threshold,
        providers=served.providers,
        requested_providers=served.requested_providers,
        sha256=served.sha256,
        card=served.card,
        card_source=served.card_source,
        quality=_quality_calibration(served.pipeline),
        metadata={key: value for key, value in info.metadata.items() if key != META_PREFIX + "card"},
    )

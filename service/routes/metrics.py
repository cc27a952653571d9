"""Prometheus metrics in the text exposition format (always open, even when API keys are set)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.routes.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text."}
    },
)
async def metrics(registry: MetricsDep) -> Response:
    """Request counts and latencies, inference latency, in-flight requests and model info."""
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)

"""Liveness and readiness probes (always open, even when API keys are set)."""

from __future__ import annotations

from typing import cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.routes.deps import ServedModel, SettingsDep
from service.schemas import LiveResponse, ModelRef, ReadyResponse

router = APIRouter(prefix="/health", tags=["health"])


@router.get("/live", operation_id="health_live", response_model=LiveResponse)
async def live() -> LiveResponse:
    """The process is up and answering."""
    return LiveResponse()


@router.get(
    "/ready",
    operation_id="health_ready",
    response_model=ReadyResponse,
    responses={
        503: {
            "model": ReadyResponse,
            "description": "Not ready: loading, warming up, shutting down, or a required provider is "
            "not in use.",
        }
    },
)
async def ready(request: Request, settings: SettingsDep) -> JSONResponse:
    """The model is loaded, warmed up and on the providers asked for (503 otherwise)."""
    served = cast(ServedModel | None, getattr(request.app.state, "served", None))
    reason = request.app.state.not_ready_reason
    is_ready = reason is None and served is not None
    body = ReadyResponse(
        status="ready" if is_ready else "not_ready",
        model=ModelRef(name=served.info.name, version=served.info.version) if served else None,
        providers=served.providers if served else [],
        requested_providers=list(settings.providers),
        fallback=served.fallback if served else False,
        reason=None if is_ready else str(reason),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if is_ready else 503)

"""What the routes share: the served model, the inference slots, the settings, the API-key check.

Each is a typed dependency (``PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]``) reading the
app's state, which the lifespan fills in (``service.main``).
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

import anyio
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.config import Settings
from service.errors import ServiceError
from service.inference import ModelInfo
from service.observability import Metrics
from service.pipeline import Pipeline
from service.schemas import CardSource

#: ``app.state.not_ready_reason`` as the app starts; None once loaded, warmed up, on the providers required.
NOT_LOADED = "the model is not loaded yet"
WARMING_UP = "warming up"
SHUTTING_DOWN = "shutting down"


@dataclass(frozen=True)
class ServedModel:
    """The loaded model as the routes see it.

    Attributes:
        info: what the model says about itself.
        pipeline: decode, pre-processing, the ONNX Runtime session, post-processing and encode.
        providers: the providers the session really runs on.
        requested_providers: the providers the settings asked for.
        sha256: of the ONNX file.
        not_ready_reason: why the model must not serve (a required provider is not in use), or None.
        fallback: the session does not run on the first provider asked for (e.g. cuda asked, CPU used).
        card: the model card: the sidecar ``NAME.json`` when it describes this very file (it gathers the
            evaluations made after the export), else the card embedded in the ONNX metadata.
        card_source: ``sidecar`` or ``embedded``.
    """

    info: ModelInfo
    pipeline: Pipeline
    providers: list[str]
    requested_providers: list[str]
    sha256: str
    not_ready_reason: str | None = None
    fallback: bool = False
    card: dict[str, Any] = field(default_factory=dict)
    card_source: CardSource = "embedded"


class InferenceLimiter:
    """At most ``max_concurrency`` segmentations at once and ``max_queued`` waiting; beyond: 503.

    Refusing early keeps latency bounded under load instead of queueing without limit. The counters are
    only touched from the event loop, so the check and the increment cannot interleave.
    """

    def __init__(self, max_concurrency: int, max_queued: int, retry_after_s: int, metrics: Metrics) -> None:
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.running = 0
        self.waiting = 0
        self._semaphore = anyio.Semaphore(max_concurrency)

    async def acquire(self) -> None:
        """Takes a slot, waiting in the queue when there is room; raises 503 ``overloaded`` otherwise."""
        if self.running + self.waiting >= self.max_concurrency + self.max_queued:
            raise ServiceError(
                503,
                "overloaded",
                f"the service is busy ({self.running} running, {self.waiting} waiting); retry shortly",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.waiting += 1
        self.metrics.segmentations_waiting.inc()
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
            self.metrics.segmentations_waiting.dec()
        self.running += 1
        self.metrics.segmentations_running.inc()

    def release(self) -> None:
        self.running -= 1
        self.metrics.segmentations_running.dec()
        self._semaphore.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()


def get_settings(request: Request) -> Settings:
    return cast(Settings, request.app.state.settings)


def get_metrics(request: Request) -> Metrics:
    return cast(Metrics, request.app.state.metrics)


def get_limiter(request: Request) -> InferenceLimiter:
    return cast(InferenceLimiter, request.app.state.limiter)


def get_loaded_model(request: Request) -> ServedModel:
    """The loaded model, ready or not (503 ``not_ready`` while it is still loading)."""
    served = cast(ServedModel | None, getattr(request.app.state, "served", None))
    if served is None:
        raise ServiceError(503, "not_ready", NOT_LOADED, headers={"Retry-After": "5"})
    return served


def get_served_model(
    request: Request, served: Annotated[ServedModel, Depends(get_loaded_model)]
) -> ServedModel:
    """The model when it may serve; 503 ``not_ready`` before warm-up or if a required provider is missing."""
    reason = request.app.state.not_ready_reason
    if reason is not None:
        raise ServiceError(
            503,
            "not_ready",
            reason,
            headers={"Retry-After": "5"},
        )
    return served


def get_pipeline(served: Annotated[ServedModel, Depends(get_served_model)]) -> Pipeline:
    return served.pipeline


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
LimiterDep = Annotated[InferenceLimiter, Depends(get_limiter)]
LoadedModelDep = Annotated[ServedModel, Depends(get_loaded_model)]
ServedModelDep = Annotated[ServedModel, Depends(get_served_model)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]

_api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Needed only when the service is configured with API keys.",
)
_bearer = HTTPBearer(auto_error=False, description="Alternative to X-API-Key: Authorization: Bearer <key>.")


def _matches_any(presented: str, keys: list[bytes]) -> bool:
    candidate = presented.encode()
    found = False
    for key in keys:  # no early exit: the time taken does not say which key (if any) matched
        found |= hmac.compare_digest(candidate, key)
    return found


async def require_api_key(
    settings: SettingsDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Lets the request through when no keys are configured or when it carries one of them; 401 otherwise."""
    keys = settings.api_key_bytes()
    if not keys:
        return
    presented = api_key if api_key is not None else (bearer.credentials if bearer is not None else None)
    if presented is None or not _matches_any(presented, keys):
        raise ServiceError(
            401,
            "unauthorized",
            "a valid API key is needed (X-API-Key header or Authorization: Bearer)",
            headers={"WWW-Authenticate": 'Bearer realm="dermaseg"'},
        )

"""Metrics (Prometheus, one registry per app), request ids and the one-line structured request log.

The request middleware is pure ASGI and sits outermost: it sees every request (health, metrics and docs
included), gives it an id (``X-Request-ID``, taken from the client when it looks safe), counts it, times
it, turns any unexpected exception into a bare ``internal_error`` 500 and logs one JSON line. Logs carry
the request id, route, status and timings only: never an upload, a header value or a query string.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.quality import QualityAssessment

access_logger = logging.getLogger("dermaseg.access")
logger = logging.getLogger("dermaseg")

REQUEST_ID_HEADER = "X-Request-ID"
#: A client's own request id is echoed only when it is short and harmless in a log line.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
#: Routes polled by orchestrators and scrapers: logged at DEBUG so they don't drown the log.
QUIET_ROUTES = frozenset({"/health/live", "/health/ready", "/metrics"})

_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


#: Histogram buckets of the estimated Jaccard: fine where review thresholds sit.
_JACCARD_BUCKETS = (0.3, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (tests build many apps)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "dermaseg_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "dermaseg_http_request_duration_seconds",
            "Time from the request's arrival to its answer, by route template and method.",
            ["route", "method"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "dermaseg_http_requests_in_flight", "HTTP requests being handled now.", registry=self.registry
        )
        self.inference_latency = Histogram(
            "dermaseg_inference_duration_seconds",
            "ONNX Runtime session time per segmentation (all flips with flip_tta).",
            buckets=_INFERENCE_BUCKETS,
            registry=self.registry,
        )
        # Drift without labels: a falling estimate, or a rising share of flagged answers, says the photos
        # coming in differ from those the model was validated on (docs/quality.md has an alert rule).
        self.estimated_jaccard = Histogram(
            "dermaseg_estimated_jaccard",
            "Estimated Jaccard of each answer's mask (the quality estimator).",
            buckets=_JACCARD_BUCKETS,
            registry=self.registry,
        )
        self.review_recommended = Counter(
            "dermaseg_review_recommended",
            "Answers flagged review_recommended (their estimated Jaccard is below the review threshold).",
            registry=self.registry,
        )
        self.review_reasons = Counter(
            "dermaseg_review_reasons",
            "Reasons given with flagged answers (an answer may give several).",
            ["reason"],
            registry=self.registry,
        )
        self.segmentations_running = Gauge(
            "dermaseg_segmentations_running",
            "Segmentations holding an inference slot.",
            registry=self.registry,
        )
        self.segmentations_waiting = Gauge(
            "dermaseg_segmentations_waiting",
            "Requests waiting for an inference slot.",
            registry=self.registry,
        )
        self.ready = Gauge(
            "dermaseg_ready", "1 when the model is loaded, warmed up and ready.", registry=self.registry
        )
        self.model = Info(
            "dermaseg_model",
            "The served model, the providers it runs on and those asked for.",
            registry=self.registry,
        )
        self.provider_fallback = Gauge(
            "dermaseg_provider_fallback",
            "1 when the session does not run on the first provider asked for (e.g. cuda asked, CPU used).",
            registry=self.registry,
        )

    def observe_quality(self, quality: QualityAssessment | None) -> None:
        """Counts one answer's quality (nothing when the model has no estimator)."""
        if quality is None:
            return
        self.estimated_jaccard.observe(quality.estimated_jaccard)
        if quality.review_recommended:
            self.review_recommended.inc()
            for reason in quality.reasons:
                self.review_reasons.labels(reason=reason).inc()

    def set_model(
        self,
        name: str,
        version: str,
        providers: Sequence[str],
        requested_providers: Sequence[str],
        *,
        fallback: bool,
    ) -> None:
        """Describes the loaded model (readiness is set apart, once it is warmed up)."""
        self.model.info(
            {
                "name": name,
                "version": version,
                "providers": ",".join(providers),
                "requested_providers": ",".join(requested_providers),
                "fallback": "true" if fallback else "false",
            }
        )
        self.provider_fallback.set(1 if fallback else 0)


def _incoming_request_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"x-request-id":
            text = value.decode("latin-1")
            return text if _SAFE_REQUEST_ID.fullmatch(text) else None
    return None


def route_label(scope: Scope) -> str:
    """The matched route's template (bounded cardinality), or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def request_state(scope: Scope) -> dict[str, Any]:
    """The per-request state dict that ``request.state`` reads and writes."""
    state: dict[str, Any] = scope.setdefault("state", {})
    return state


class RequestMiddleware:
    """Request id, metrics, the one-line access log and the last-resort 500 (pure ASGI, outermost)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        state = request_state(scope)
        state["request_id"] = request_id
        state["started_at"] = start
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error (request_id=%s)", request_id)
            if response_started:
                raise
            response = error_response(
                500, "internal_error", f"internal error; quote request id {request_id} when reporting it"
            )
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = route_label(scope)
            method = str(scope.get("method", ""))
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.request_latency.labels(route=route, method=method).observe(elapsed)
            record: dict[str, Any] = {
                "request_id": request_id,
                "method": method,
                "route": route,
                "status": status,
                "ms": round(elapsed * 1000.0, 2),
            }
            timings = state.get("timings")
            if timings:
                record["timings_ms"] = timings
            level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
            access_logger.log(level, json.dumps(record, separators=(",", ":")))


#: Libraries that log what they parse at DEBUG: Pillow logs every EXIF tag of a photo it opens (names,
#: dates, comments), the multipart parser logs the parts. Uploads must never reach the log, so these stay at
#: WARNING whatever the service's own level.
PAYLOAD_LOGGERS = ("PIL", "python_multipart", "multipart")


def silence_payload_loggers() -> None:
    """Keeps the loggers that would write parts of an upload at WARNING or above."""
    for name in PAYLOAD_LOGGERS:
        library = logging.getLogger(name)
        if library.getEffectiveLevel() < logging.WARNING:
            library.setLevel(logging.WARNING)


def configure_logging(level: str) -> None:
    """One-line logs on stderr for the service and uvicorn (uvicorn's access log is replaced by ours)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    silence_payload_loggers()

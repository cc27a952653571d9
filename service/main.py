"""The FastAPI app factory, its lifespan, and ``serve()`` / ``python -m service.main``.

``create_app(settings)`` builds the app without touching the model; the lifespan loads it once, then lets
the server listen while it warms the model up, and only then marks the app ready (``/health/ready`` is 503
``warming up`` until then). A missing or corrupt model fails the start-up with one clear line (uvicorn then
exits non-zero); a required provider that is not in use leaves the app up but not ready.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.errors import install_error_handlers
from service.inference import (
    CardError,
    ModelLoadError,
    OnnxModel,
    import_onnxruntime,
    load_card,
    resolve_providers,
    sha256_file,
)
from service.observability import Metrics, RequestMiddleware, configure_logging, silence_payload_loggers
from service.pipeline import Pipeline
from service.quality import QualityFileError, load_estimator
from service.routes import health, model, segment, v2, viewer
from service.routes import metrics as metrics_routes
from service.routes.deps import NOT_LOADED, SHUTTING_DOWN, WARMING_UP, InferenceLimiter, ServedModel
from service.schemas import CardSource
from service.server import header_deadline_protocol

logger = logging.getLogger("dermaseg")

#: Seconds uvicorn lets requests in flight finish after SIGTERM (Kubernetes' grace period covers it).
GRACEFUL_SHUTDOWN_S = 10

DESCRIPTION = """Skin-lesion segmentation of dermoscopic photos (research use, not for diagnosis).

Upload a photo to `POST /segment` as multipart/form-data (field `file`); the answer holds the lesion's
mask and probability map as PNGs the size of the photo, its area and bounding box. Errors are
`{"error": {"code": "...", "message": "..."}}` with a stable code. When the service is configured with
API keys, `/segment` and `/v1/model` need `X-API-Key` or `Authorization: Bearer`; health and metrics are
always open.

The same model also speaks the Open Inference Protocol (KServe V2 / Triton HTTP) under `/v2`, as model
`dermaseg`: `POST /v2/models/dermaseg/infer` with input `image` (BYTES `[1]`, the photo; base64 in JSON,
raw with the binary tensor extension), outputs `mask`, `probability` and `area_px`. Its errors are the
protocol's `{"error": "...", "code": "..."}`; its infer and model metadata need the API key, its health
and readiness routes do not.
"""

OPENAPI_TAGS = [
    {"name": "segmentation", "description": "Segment a photo."},
    {"name": "model", "description": "The served model."},
    {"name": "health", "description": "Liveness and readiness probes."},
    {"name": "metrics", "description": "Prometheus metrics."},
    {
        "name": "open inference protocol",
        "description": "The KServe V2 / Triton HTTP API (JSON and binary tensors), beside /segment.",
    },
]


def _version() -> str:
    try:
        return metadata.version("dermaseg")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _preload_cuda_libraries(providers: Sequence[str]) -> None:
    """Loads the CUDA/cuDNN libraries from PyPI (``onnxruntime-gpu[cuda,cudnn]``) before the session.

    Without this the CUDA provider cannot find them (they are not on the loader path) and ONNX Runtime
    silently falls back to CPU.
    """
    if "CUDAExecutionProvider" not in resolve_providers(providers):
        return
    ort = import_onnxruntime()
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or "CUDAExecutionProvider" not in ort.get_available_providers():
        return
    try:
        preload()
    except Exception as error:  # a missing library shows up as the provider not in use; say why here
        logger.warning("could not preload the CUDA libraries: %s", error)


def load_served_model(settings: Settings) -> ServedModel:
    """Opens the ONNX model on the providers asked for and checks what it really runs on.

    Raises:
        ModelLoadError: missing, unreadable or non-conforming model, or a quality estimator that is invalid
            or calibrated on another model.
    """
    _preload_cuda_libraries(settings.providers)
    onnx_model = OnnxModel(
        settings.model_path,
        settings.providers,
        # Checked below instead, so that a missing provider makes the app not-ready (503) rather than absent.
        require_providers=False,
        intra_op_threads=settings.resolved_intra_op_threads(),
        inter_op_threads=settings.inter_op_threads,
        thread_spinning=settings.thread_spinning,
    )
    first_wanted = resolve_providers(settings.providers)[0]
    fallback = first_wanted not in onnx_model.providers
    if fallback:
        logger.warning(
            "%s was asked for but is not in use: the session runs on %s", first_wanted, onnx_model.providers
        )
    reason = None
    if settings.require_providers and fallback:
        reason = f"{first_wanted} was required but the session runs on {onnx_model.providers}"
    digest = sha256_file(onnx_model.path)
    card, card_source = read_card(onnx_model.path, digest, onnx_model.info.card)
    try:
        quality = load_estimator(onnx_model.path, digest, settings.quality_path)
    except QualityFileError as error:
        raise ModelLoadError(f"quality estimator: {error}") from None
    if quality is None:
        logger.warning("no quality estimator beside %s: answers carry no estimated Jaccard", onnx_model.path)
    pipeline = onnx_model.pipeline(
        batch_size=1,
        png_compress_level=settings.png_compress_level,
        quality=quality,
        review_below=settings.review_below,
    )
    return ServedModel(
        info=onnx_model.info,
        pipeline=pipeline,
        providers=list(onnx_model.providers),
        requested_providers=list(settings.providers),
        sha256=digest,
        not_ready_reason=reason,
        fallback=fallback,
        card=card,
        card_source=card_source,
    )


def read_card(model_path: Path, sha256: str, embedded: dict[str, Any]) -> tuple[dict[str, Any], CardSource]:
    """The sidecar card ``NAME.json`` when it is about this file (same sha256), else the embedded one.

    The sidecar gathers what was learnt after the export (``dermaseg evaluate --card``); a sidecar that is
    unreadable or belongs to another file is ignored with a warning, never trusted.
    """
    sidecar = model_path.with_suffix(".json")
    if not sidecar.is_file():
        return embedded, "embedded"
    try:
        return load_card(sidecar, sha256), "sidecar"
    except CardError as error:
        logger.warning("ignoring the model card: %s", error)
        return embedded, "embedded"


def warm_up(pipeline: Pipeline, runs: int) -> None:
    """Runs the whole pipeline on a gray photo so that the first request does not pay for lazy set-up."""
    height, width = pipeline.input_size
    photo = np.full((height, width, 3), 128, dtype=np.uint8)
    for _ in range(runs):
        pipeline.segment([photo])


async def _warm_up_then_ready(app: FastAPI, served: ServedModel, runs: int, started: float) -> None:
    """Warms the model up while the server already answers probes, then marks the app ready.

    A warm-up that fails leaves the app up but not ready, with the reason in ``/health/ready`` and the log.
    """
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    try:
        await anyio.to_thread.run_sync(warm_up, served.pipeline, runs, abandon_on_cancel=True)
    except Exception as error:
        app.state.not_ready_reason = f"warm-up failed: {type(error).__name__}: {error}"
        logger.error("model loaded but NOT READY: %s", app.state.not_ready_reason)
        return
    app.state.not_ready_reason = served.not_ready_reason
    metrics.ready.set(0 if served.not_ready_reason else 1)
    if served.not_ready_reason:
        logger.error("model loaded but NOT READY: %s", served.not_ready_reason)
        return
    logger.info(
        "ready: model %s %s on %s%s, %d intra-op thread(s) × %d at once (loaded and warmed up in %.0f ms)",
        served.info.name,
        served.info.version,
        ",".join(served.providers),
        f" (FALLBACK: {served.requested_providers[0]} was asked for)" if served.fallback else "",
        settings.resolved_intra_op_threads(),
        settings.max_concurrency,
        (time.perf_counter() - started) * 1000.0,
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    started = time.perf_counter()
    try:
        served = await anyio.to_thread.run_sync(load_served_model, settings)
    except ModelLoadError as error:
        app.state.startup_error = f"cannot start DermaSeg: {error}"
        raise
    # Loaded: from here the server listens (liveness answers) while readiness says 503 until warmed up.
    app.state.served = served
    app.state.not_ready_reason = WARMING_UP
    metrics.set_model(
        served.info.name,
        served.info.version,
        served.providers,
        served.requested_providers,
        fallback=served.fallback,
    )
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_warm_up_then_ready, app, served, settings.warmup_runs, started)
        try:
            yield
        finally:
            app.state.not_ready_reason = SHUTTING_DOWN
            metrics.ready.set(0)
            tasks.cancel_scope.cancel()


class _OneLineStartupFailure:
    """Replaces the traceback of a failed start-up by the lifespan's one-line reason (ModelLoadError).

    The server (uvicorn) logs the lifespan's failure message; for a missing or corrupt model file the
    operator needs one clear sentence, not a stack trace. Other failures keep their traceback.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short(message: Message) -> None:
            reason = getattr(scope["app"].state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and reason:
                message = {**message, "message": reason}
            await send(message)

        await self.app(scope, receive, send_short)


#: glibc's mallopt parameter: allocations at least this large are mmapped (and unmapped when freed).
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_buffers_to_the_os() -> None:
    """Pins glibc's mmap threshold at 1 MiB, so that a photo-sized buffer goes back to the OS when freed.

    By default glibc raises the threshold each time a large mmapped block is freed (up to 32 MiB), after
    which the next photo-sized arrays come from the worker threads' heaps and stay resident: the load run
    measured +15 % resident memory with the 6–24 MB float maps of OpenCV's upsampling, +3 % with this.
    A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        return


def create_app(settings: Settings | None = None) -> FastAPI:
    """Builds the app (routes, error handlers, middleware); the model is loaded by its lifespan.

    Args:
        settings: defaults to ``Settings()``, i.e. the ``DERMASEG_*`` environment.
    """
    settings = settings if settings is not None else Settings()
    return_large_buffers_to_the_os()
    silence_payload_loggers()
    metrics = Metrics()
    app = FastAPI(
        title="DermaSeg",
        summary="Skin-lesion segmentation service",
        description=DESCRIPTION,
        version=_version(),
        lifespan=_lifespan,
        openapi_tags=OPENAPI_TAGS,
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.limiter = InferenceLimiter(
        settings.max_concurrency, settings.max_queued, settings.retry_after_s, metrics
    )
    app.state.served = None
    app.state.not_ready_reason = NOT_LOADED
    app.state.startup_error = None
    install_error_handlers(app)
    app.include_router(segment.router)
    app.include_router(model.router)
    app.include_router(health.router)
    app.include_router(metrics_routes.router)
    app.include_router(v2.router)
    if settings.viewer:
        app.include_router(viewer.build_router())
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID", "Content-Type", "Accept"],
            expose_headers=[
                "X-Request-ID",
                "Server-Timing",
                "X-Lesion-Found",
                "X-Lesion-Area-Px",
                "X-Lesion-Estimated-Jaccard",
                "X-Lesion-Review",
                "X-Model",
            ],
        )
    # Added last, so outermost: it sees (and counts, and logs) every request, CORS preflights included.
    app.add_middleware(RequestMiddleware, metrics=metrics)
    app.add_middleware(_OneLineStartupFailure)
    return app


def load_settings(model: Path | None = None) -> Settings:
    """``Settings()`` from the environment (``model`` overrides the model path); bad values exit 2."""
    try:
        return Settings(model_path=model) if model is not None else Settings()
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        print(f"dermaseg: invalid settings (DERMASEG_* environment): {problems}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(
    host: str = "127.0.0.1", port: int = 8000, model: Path | None = None, *, settings: Settings | None = None
) -> None:
    """Runs the service with uvicorn until interrupted (exits with status 3 when the start-up fails).

    Args:
        host / port: where to listen.
        model: an ONNX model to serve instead of the one in the settings.
        settings: defaults to the environment's.
    """
    import uvicorn

    if settings is None:
        settings = load_settings(model)
    elif model is not None:
        settings = settings.model_copy(update={"model_path": Path(model).expanduser().resolve()})
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,  # keep configure_logging's format for uvicorn's own lines
        access_log=False,  # RequestMiddleware writes the access log (with request ids, without queries)
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        http=header_deadline_protocol(settings.http, settings.header_timeout_s),
        loop=settings.loop,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m service.main``: host and port default to the settings (DERMASEG_HOST, PORT)."""
    parser = argparse.ArgumentParser(prog="python -m service.main", description="Run the DermaSeg service.")
    parser.add_argument("--host", default=None, help="default: DERMASEG_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: DERMASEG_PORT, PORT or 8000")
    parser.add_argument("--model", type=Path, default=None, help="default: DERMASEG_MODEL_PATH")
    args = parser.parse_args(argv)
    settings = load_settings(args.model)
    serve(
        host=args.host or settings.host,
        port=args.port or settings.port,
        settings=settings,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The service's settings: one pydantic-settings class, read from ``DERMASEG_*`` environment variables.

This is the only place in the service that reads the environment. Lists (providers, API keys, CORS
origins) may be given as JSON (``["cuda", "cpu"]``) or comma-separated (``cuda,cpu``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The repository (or, installed, the site-packages) folder that holds ``service/``.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
#: Where the shipped model lives in a checkout.
DEFAULT_MODEL_PATH = PACKAGE_ROOT / "models" / "dermaseg.onnx"

MIB = 1024 * 1024


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: Environment ONNX Runtime reads when it loads, set (unless the operator set them) before its first import.
#: Its Linux wheels carry Microsoft's 1DS telemetry, on by default, which writes a session file into $TMPDIR
#: as the library loads: a service that handles patients' photos sends nothing it was not told to.
ONNXRUNTIME_ENVIRONMENT = {"ORT_DISABLE_TELEMETRY": "1"}


def set_onnxruntime_environment() -> None:
    """Sets :data:`ONNXRUNTIME_ENVIRONMENT`'s variables that the environment does not already have."""
    for name, value in ONNXRUNTIME_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


#: Names that stand for several providers: the GPU image sets DERMASEG_PROVIDERS=gpu (its FLAVOR).
PROVIDER_SHORTHANDS = {"gpu": ["cuda", "cpu"]}

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _split_list(value: Any) -> Any:
    """Accepts a JSON list or a comma-separated string for list settings given as text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """DermaSeg service settings (environment variables ``DERMASEG_<FIELD>``, e.g. ``DERMASEG_PROVIDERS``)."""

    model_config = SettingsConfigDict(
        env_prefix="DERMASEG_", extra="ignore", populate_by_name=True, frozen=True
    )

    model_path: Path = Field(
        default=DEFAULT_MODEL_PATH,
        description="The ONNX model to serve. A relative path is taken from the current directory; "
        "the default is models/dermaseg.onnx beside the service package.",
    )
    quality_path: Path | None = Field(
        default=None,
        description="The outline-quality estimator calibrated on the model (`dermaseg calibrate-quality`). "
        "Unset: NAME.quality.json beside the model; without one, answers carry no quality estimate.",
    )
    review_below: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Answers whose estimated Jaccard is below this are flagged review_recommended. Unset: "
        "the estimator's own, chosen on validation photos (docs/quality.md).",
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["cpu"],
        description="ONNX Runtime execution providers in order of preference: cpu, cuda, tensorrt or "
        "full provider names (gpu is short for cuda,cpu). CPU is always the last resort.",
    )
    require_providers: bool = Field(
        default=False,
        description="When the first provider (e.g. cuda) is not what the session really runs on, report "
        "not-ready (503) and refuse to segment instead of serving from the fallback.",
    )
    intra_op_threads: int | None = Field(
        default=None,
        ge=0,
        description="ONNX Runtime intra-op threads per session run. Unset: the usable CPUs divided by "
        "max_concurrency (at least 1), so that concurrent segmentations do not fight over cores; 0: ONNX "
        "Runtime's own choice (all cores for each run).",
    )
    inter_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime inter-op threads (0: its choice)."
    )
    thread_spinning: bool | None = Field(
        default=None,
        description="Whether ONNX Runtime's idle intra-op threads spin (unset: its default, on).",
    )
    warmup_runs: int = Field(default=1, ge=0, description="Inferences run at start-up before ready.")

    max_upload_bytes: int = Field(
        default=20 * MIB, ge=1, description="Largest request body accepted, in bytes (413 beyond)."
    )
    max_pixels: int = Field(
        default=50_000_000,
        ge=1,
        description="Largest image accepted, in pixels (width × height; 413 beyond).",
    )
    max_concurrency: int = Field(
        default=2, ge=1, description="Segmentations (decode, inference, encode) run at the same time."
    )
    max_queued: int = Field(
        default=16,
        ge=0,
        description="Requests allowed to wait for a free slot; beyond that: 503 with Retry-After.",
    )
    png_compress_level: int = Field(
        default=1,
        ge=0,
        le=9,
        description="zlib level of the PNGs returned (0–9): 1 encodes a 1024 × 768 confidence map about 4× "
        "faster than Pillow's 6 for about 30 % more bytes.",
    )
    upload_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest time an upload may take to arrive, in seconds; a slower or stalled one is "
        "cut off with 408.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest time a client may take to send a request's line and headers, from connecting "
        "or from the previous answer, in seconds (`python -m service.main`); beyond it: 408 and the "
        "connection closed.",
    )
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After (seconds) sent with 503 overloaded.")

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="When set, /segment and /v1/model need one of these keys in X-API-Key or "
        "Authorization: Bearer (health and metrics stay open).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (none by default: CORS off)."
    )
    docs: bool = Field(
        default=False,
        description="Serve /docs, /redoc and /openapi.json (off by default: the contract is "
        "openapi/openapi.json in the repository).",
    )
    viewer: bool = Field(
        default=True,
        description="Serve the viewer page at / (a static page, same origin only, that calls /segment with "
        "the same API keys as any client; docs/security.md says why it is on by default).",
    )
    log_level: LogLevel = Field(default="INFO", description="Logging level.")

    http: Literal["auto", "h11", "httptools"] = Field(
        default="auto",
        description="uvicorn's HTTP parser (auto: httptools where installed, as it is with the service).",
    )
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto", description="uvicorn's event loop (auto: uvloop where installed, as it is on Linux)."
    )
    host: str = Field(default="127.0.0.1", description="Address `python -m service.main` listens on.")
    port: int = Field(
        default=8000,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("DERMASEG_PORT", "PORT", "port"),
        description="Port `python -m service.main` listens on (DERMASEG_PORT, or PORT as platforms set it).",
    )

    def resolved_intra_op_threads(self) -> int:
        """The intra-op thread count the session gets (see ``intra_op_threads``)."""
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        return max(1, usable_cpus() // self.max_concurrency)

    @field_validator("providers", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _lists_from_text(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("providers")
    @classmethod
    def _expand_providers(cls, value: list[str]) -> list[str]:
        expanded: list[str] = []
        for name in value:
            for provider in PROVIDER_SHORTHANDS.get(name.lower(), [name]):
                if provider not in expanded:
                    expanded.append(provider)
        if not expanded:
            raise ValueError("at least one provider is needed (e.g. cpu)")
        return expanded

    @field_validator("model_path")
    @classmethod
    def _absolute_model_path(cls, value: Path) -> Path:
        # Resolved once, so that what the logs say does not depend on a later chdir.
        return value.expanduser().resolve()

    def api_key_bytes(self) -> list[bytes]:
        """The API keys as bytes, for constant-time comparison."""
        return [key.get_secret_value().encode() for key in self.api_keys]

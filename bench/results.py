"""What one run of ``python -m bench`` measured: the model it ran and every section's results."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.decode_check import DecodeCheck
from bench.flops import FlopCount
from bench.http_load import HttpResult
from bench.keras_compare import KerasResult
from bench.machine import Machine, PeakEstimate
from bench.pipeline import PipelineResult
from bench.raw import RawResult, SessionSetting
from bench.variants import VariantsResult


@dataclass(frozen=True)
class ModelDescription:
    """The ONNX model benchmarked."""

    path: str
    name: str
    version: str
    input_size: tuple[int, int]
    threshold: float
    precision: str
    size_bytes: int
    sha256: str
    providers: list[str]


@dataclass
class BenchResults:
    """Everything one run measured (sections left out are empty or None)."""

    machine: Machine
    model: ModelDescription
    photo: str
    effort: str
    peak: PeakEstimate
    note: str | None = None
    raw: list[RawResult] = field(default_factory=list)
    pipeline: PipelineResult | None = None
    http: list[HttpResult] = field(default_factory=list)
    variants: VariantsResult | None = None
    flops: FlopCount | None = None
    keras: KerasResult | None = None
    decode_check: DecodeCheck | None = None
    #: numpy float32 matrix product, GFLOP/s by BLAS thread count (the practical roof).
    gemm_gflops: dict[int, float | None] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def best_raw(self) -> RawResult | None:
        """The raw measurement with the most images/s (the service's ceiling)."""
        return max(self.raw, key=lambda r: r.images_per_s) if self.raw else None

    def raw_at(self, batch: int, setting: SessionSetting | None = None) -> RawResult | None:
        """The raw measurement at ``batch`` with ``setting`` (default: ONNX Runtime's own settings)."""
        setting = setting or SessionSetting()
        return next((r for r in self.raw if r.batch == batch and r.setting == setting), None)

"""What the benchmark ran on: CPU, cores, memory, versions, load; and the CPU's float32 peak (an estimate)."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
MEMINFO = Path("/proc/meminfo")
LOADAVG = Path("/proc/loadavg")
MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")

#: float32 lanes of one vector register, by the widest SIMD the CPU flags announce.
SIMD_LANES = (("avx512f", 16, "AVX-512"), ("avx2", 8, "AVX2"), ("avx", 8, "AVX"), ("sse2", 4, "SSE2"))
#: FMA units per core assumed: two on today's server cores (Intel Xeon since Skylake-SP Gold 6xxx, AMD
#: Zen 4 and 5); the CPU does not say so itself, so the peak is an upper bound for a one-unit core.
ASSUMED_FMA_UNITS = 2


@dataclass
class Machine:
    """The machine and the software the figures were measured with."""

    cpu_model: str
    cpus: int
    threads_per_core: int | None
    cpu_mhz: float | None
    flags: list[str] = field(default_factory=list)
    memory_gib: float | None = None
    os: str = ""
    python: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    date: str = ""
    command: str = ""
    load_start: tuple[float, float, float] | None = None
    load_end: tuple[float, float, float] | None = None

    @property
    def contended(self) -> bool:
        """Other work was running: a 1-minute load average over half the cores when the benchmark began.

        The load at the end is reported but not judged: by then it counts the benchmark's own work.
        """
        return self.load_start is not None and self.load_start[0] > 0.5 * self.cpus


@dataclass(frozen=True)
class PeakEstimate:
    """The CPU's float32 peak, ``cores × GHz × FLOP/cycle/core``, and the assumptions behind it."""

    gflops: float | None
    cores: int
    ghz: float | None
    flops_per_cycle: int
    simd: str
    assumption: str


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo (empty when unreadable)."""
    fields: dict[str, str] = {}
    try:
        text = CPUINFO.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _threads_per_core(info: dict[str, str]) -> int | None:
    try:
        siblings, cores = int(info["siblings"]), int(info["cpu cores"])
    except (KeyError, ValueError):
        return None
    return max(1, siblings // cores) if cores else None


def read_load() -> tuple[float, float, float] | None:
    """The 1-, 5- and 15-minute load averages (None where /proc/loadavg is missing)."""
    try:
        one, five, fifteen = LOADAVG.read_text().split()[:3]
    except (OSError, ValueError):
        return None
    return float(one), float(five), float(fifteen)


def _memory_gib() -> float | None:
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def describe_machine(arguments: list[str] | None = None) -> Machine:
    """Reads the CPU, memory, versions and load average now; ``arguments`` are the command's, to report."""
    info = _cpuinfo_fields()
    mhz = None
    if "cpu MHz" in info:
        try:
            mhz = float(info["cpu MHz"])
        except ValueError:
            mhz = None
    arguments = list(sys.argv[1:] if arguments is None else arguments)
    command = shlex.join(["python", "-m", "bench", *arguments])
    return Machine(
        cpu_model=info.get("model name", platform.processor() or "unknown"),
        cpus=usable_cpus(),
        threads_per_core=_threads_per_core(info),
        cpu_mhz=mhz,
        flags=info.get("flags", "").split(),
        memory_gib=_memory_gib(),
        os=platform.platform(),
        python=platform.python_version(),
        versions={
            package: _version(package)
            for package in ("onnxruntime", "numpy", "pillow", "fastapi", "uvicorn", "httpx", "onnx")
        },
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        load_start=read_load(),
    )


def max_ghz() -> float | None:
    """The highest clock cpufreq allows (boost included), where the kernel exposes it (not in most VMs)."""
    try:
        return int(MAX_FREQ.read_text().strip()) / 1e6
    except (OSError, ValueError):
        return None


#: A float32 matrix product timed in a fresh interpreter, so that its BLAS thread count can be set.
GEMM_SCRIPT = """
import time, numpy as np
n, repeats = {n}, {repeats}
a = np.random.default_rng(0).random((n, n), dtype=np.float32)
b = a.copy()
a @ b
best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(repeats))
print(2 * n ** 3 / best / 1e9)
"""


#: The AVX-512 kernels of OpenBLAS; without them it may fall back to AVX2 ones on CPUs newer than itself.
AVX512_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})
GEMM_AVX512_CORE = "SkylakeX"


def measure_gemm_gflops(
    threads: int, flags: list[str] | None = None, size: int = 2048, repeats: int = 5
) -> float | None:
    """GFLOP/s of numpy's float32 ``size × size`` matrix product on ``threads`` BLAS threads (best run).

    A practical roof for dense float32 work on this CPU (BLAS kernels run close to the hardware's peak),
    measured under the same conditions as the rest of the run. Where ``flags`` show AVX-512, OpenBLAS is
    made to use its AVX-512 (SkylakeX) kernels, even over an ``OPENBLAS_CORETYPE`` in the environment:
    it picks AVX2 ones for CPUs it does not know (such as AMD Zen 5), which would halve the roof, and the
    roof is about the hardware. None if it cannot be run.
    """
    env = {**os.environ}
    if AVX512_FLAGS.issubset(flags or ()):
        env["OPENBLAS_CORETYPE"] = GEMM_AVX512_CORE
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[variable] = str(threads)
    try:
        completed = subprocess.run(
            [sys.executable, "-c", GEMM_SCRIPT.format(n=size, repeats=repeats)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return float(completed.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def nominal_ghz(cpu_model: str) -> float | None:
    """The clock written in the model name (``… @ 2.10GHz``), if any."""
    match = re.search(r"@\s*([\d.]+)\s*GHz", cpu_model)
    return float(match.group(1)) if match else None


def estimate_peak(machine: Machine) -> PeakEstimate:
    """float32 peak = cores × GHz × (lanes × 2 for FMA × FMA units); the assumptions are spelled out.

    The clock is cpufreq's maximum (boost) where the kernel tells, else the model name's nominal one,
    else /proc/cpuinfo's ``cpu MHz`` (in a VM the host's base clock: boost clocks run higher, AVX-512
    clocks can run lower), so this is an order of magnitude, not a bound; the measured matrix product
    (:func:`measure_gemm_gflops`) is the practical roof.
    """
    flags = set(machine.flags)
    lanes, simd = 1, "scalar"
    for flag, width, name in SIMD_LANES:
        if flag in flags:
            lanes, simd = width, name
            break
    has_fma = "fma" in flags or "avx512f" in flags
    per_cycle = lanes * (2 if has_fma else 1) * (ASSUMED_FMA_UNITS if has_fma else 1)
    clocks = [
        (max_ghz(), "cpufreq's maximum"),
        (nominal_ghz(machine.cpu_model), "the model name"),
        (
            machine.cpu_mhz / 1000.0 if machine.cpu_mhz else None,
            "/proc/cpuinfo cpu MHz: base clock, boost runs higher",
        ),
    ]
    ghz, clock_source = next(((ghz, source) for ghz, source in clocks if ghz), (None, "unknown"))
    assumption = (
        f"{machine.cpus} cores × {ghz or float('nan'):.2f} GHz ({clock_source}) "
        f"× {per_cycle} FLOP/cycle/core "
        f"({simd}: {lanes} float32 lanes"
        + (f" × 2 (FMA) × {ASSUMED_FMA_UNITS} FMA units per core, assumed" if has_fma else ", no FMA")
        + ")"
        + (
            f"; {machine.threads_per_core} hardware threads share a core, so cores may be fewer than CPUs"
            if machine.threads_per_core and machine.threads_per_core > 1
            else ""
        )
    )
    gflops = machine.cpus * ghz * per_cycle if ghz else None
    return PeakEstimate(gflops, machine.cpus, ghz, per_cycle, simd, assumption)

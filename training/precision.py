"""Whether this machine runs a training precision natively, and a warning where it would be emulated.

``mixed_bfloat16`` is fast only where the CPU has bfloat16 instructions (AVX-512 BF16 or AMX) or a GPU
runs the steps; elsewhere TensorFlow emulates bfloat16 and training is several times slower than in
float32 (``python -m bench.train_precision`` measures it).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The CPU's feature flags, or None where ``/proc/cpuinfo`` does not give them (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def cpu_has_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """True or False where the flags are known, None where they are not."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool(flags & BFLOAT16_FLAGS)


def warn_if_emulated(precision: str, gpus: int, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Logs a warning when ``precision`` is bfloat16 and neither a GPU nor the CPU runs it natively.

    Returns:
        Whether it warned.
    """
    if "bfloat16" not in precision or gpus or cpu_has_bfloat16(cpuinfo) is not False:
        return False
    logger.warning(
        "--precision %s on a CPU without bfloat16 instructions (AVX-512 BF16 or AMX): TensorFlow emulates "
        "it and training runs several times slower than --precision float32 "
        "(python -m bench.train_precision measures both here)",
        precision,
    )
    return True

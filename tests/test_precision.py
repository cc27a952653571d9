"""training.precision: a bfloat16 run on a CPU that would emulate it is warned about, and only then."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from training.precision import cpu_flags, cpu_has_bfloat16, warn_if_emulated

EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.fixture
def cpuinfo(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return path

    return write


def test_the_flags_are_read_from_cpuinfo(cpuinfo) -> None:
    assert cpu_flags(cpuinfo(EPYC)) == {"fpu", "sse2", "avx2", "fma"}
    assert cpu_has_bfloat16(cpuinfo(EPYC)) is False
    assert cpu_has_bfloat16(cpuinfo(SAPPHIRE)) is True
    assert cpu_has_bfloat16(cpuinfo("processor\t: 0\n")) is None, "no flags line: unknown"
    assert cpu_has_bfloat16(Path("/no/such/cpuinfo")) is None


def test_bfloat16_without_the_instructions_is_warned_about(cpuinfo, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert warn_if_emulated("mixed_bfloat16", gpus=0, cpuinfo=cpuinfo(EPYC))
    assert "emulates" in caplog.text and "--precision float32" in caplog.text


@pytest.mark.parametrize(
    ("precision", "gpus", "text"),
    [
        ("mixed_bfloat16", 0, SAPPHIRE),  # native on the CPU
        ("mixed_bfloat16", 1, EPYC),  # a GPU runs the steps
        ("float32", 0, EPYC),
        ("mixed_float16", 0, EPYC),
        ("mixed_bfloat16", 0, "processor\t: 0\n"),  # flags unknown: say nothing rather than guess
    ],
)
def test_no_warning_otherwise(cpuinfo, caplog, precision: str, gpus: int, text: str) -> None:
    with caplog.at_level(logging.WARNING, logger="training.precision"):
        assert not warn_if_emulated(precision, gpus=gpus, cpuinfo=cpuinfo(text))
    assert caplog.text == ""


@pytest.mark.slow  # builds the release network twice and trains it a few steps (about a minute)
def test_the_benchmark_times_each_precision_side_by_side(capsys) -> None:
    from bench.train_precision import main

    assert main(["--precisions", "float32", "mixed_bfloat16", "--image-size", "64", "--batch-size", "2",
                 "--rounds", "2", "--steps", "1"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert set(result["images_per_second"]) == {"float32", "mixed_bfloat16"}
    assert all(rate > 0 for rate in result["images_per_second"].values())
    assert result["ratio_to_first"]["float32"] == 1.0
    assert result["cpu_has_bfloat16"] in (True, False, None)

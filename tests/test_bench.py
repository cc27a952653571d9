"""The benchmark (``python -m bench``): its FLOP counter, statistics and goals by hand, and one quick run.

The benchmark is not a timed test: nothing here asserts a speed. The end-to-end run uses the tiny
"darkness" model of ``tests.onnx_models`` and a tiny random U-Net on the Keras side, in ``--quick`` mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from bench.flops import count_flops
from bench.http_load import ServiceConfig
from bench.machine import Machine, estimate_peak
from bench.report import Goal
from bench.timing import Effort, Timing, measure, percentile
from tests.conftest import make_dataset
from tests.onnx_models import write_darkness_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def _conv_graph() -> object:
    """NCHW graph, dynamic batch: Conv 3→4 (3×3, pad 1) on 8×8, grouped Conv 4→4 (group 2, 1×1),
    ConvTranspose 4→2 (2×2, stride 2) to 16×16, Flatten, MatMul by (512, 10), Gemm by (10, 5)ᵀ."""
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    weights = {
        "w1": (4, 3, 3, 3),
        "w2": (4, 2, 1, 1),  # group 2: 4 input channels / 2 per group
        "w3": (4, 2, 2, 2),  # ConvTranspose: (C_in, C_out / group, kH, kW)
        "m": (512, 10),
        "g": (5, 10),  # Gemm with transB
    }
    initializers = [
        helper.make_tensor(name, TensorProto.FLOAT, shape, np.zeros(int(np.prod(shape))).tolist())
        for name, shape in weights.items()
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], group=2, kernel_shape=[1, 1]),
        helper.make_node("ConvTranspose", ["c2", "w3"], ["c3"], strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Flatten", ["c3"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "m"], ["mm"]),
        helper.make_node("Gemm", ["mm", "g"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "conv", [image], [output], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_flops_are_counted_exactly_on_a_hand_computed_graph() -> None:
    count = count_flops(_conv_graph())
    # Conv: 4 outputs × 8 × 8 positions × (3 channels × 3 × 3) = 256 × 27.
    # Grouped 1×1 Conv: 4 × 8 × 8 outputs × (4 / 2 channels) = 256 × 2.
    # ConvTranspose: each of 4 × 8 × 8 inputs feeds 2 channels × 2 × 2 = 256 × 8 (output 2 × 16 × 16).
    # MatMul: (1, 512) × (512, 10) = 10 × 512.  Gemm: (1, 10) × (10, 5) = 5 × 10.
    assert count.macs_by_op == {
        "Conv": 256 * 27 + 256 * 2,
        "ConvTranspose": 256 * 8,
        "MatMul": 5120,
        "Gemm": 50,
    }
    assert count.nodes_by_op == {"Conv": 2, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}
    assert count.flops == 2 * (6912 + 512 + 2048 + 5120 + 50)
    assert count.unresolved == []


def test_flops_scale_with_the_batch_asked_for() -> None:
    assert count_flops(_conv_graph(), batch=3).macs == 3 * count_flops(_conv_graph()).macs


def test_a_model_without_conv_has_no_flops_counted(tmp_path: Path) -> None:
    count = count_flops(write_darkness_model(tmp_path / "tiny.onnx"))
    assert count.flops == 0 and count.unresolved == []


def test_percentiles_interpolate_linearly() -> None:
    values = [float(v) for v in range(1, 101)]  # 1 … 100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    timing = Timing([3.0, 1.0, 2.0])
    assert (timing.n, timing.p50, timing.mean) == (3, 2.0, 2.0)


def test_measure_warms_up_then_stops_at_max_runs() -> None:
    calls = []
    effort = Effort(
        warmup=2, min_runs=3, max_runs=4, seconds=60.0, http_requests=1, http_seconds=1.0,
        validation_images=1, calibration_images=1,
    )  # fmt: skip
    timing = measure(lambda: calls.append(1), effort)
    assert len(calls) == 6 and timing.n == 4  # 2 untimed, then 4 timed: max_runs wins over seconds


def test_service_configurations_parse_settings_and_workers() -> None:
    config = ServiceConfig.parse("one-thread:max_concurrency=2,DERMASEG_INTRA_OP_THREADS=1,workers=2")
    assert config.name == "one-thread"
    assert config.settings == (("max_concurrency", "2"), ("intra_op_threads", "1"))
    assert config.workers == 2
    env = config.environment(Path("/m.onnx"))
    assert env["DERMASEG_MAX_CONCURRENCY"] == "2" and env["DERMASEG_INTRA_OP_THREADS"] == "1"
    assert env["DERMASEG_MODEL_PATH"] == "/m.onnx"
    assert ServiceConfig.parse("max_concurrency=1").name == "max_concurrency=1"
    mask_only = ServiceConfig.parse("mask-only:query=outputs=mask")
    assert (mask_only.settings, mask_only.path) == ((), "/segment?outputs=mask")
    with pytest.raises(ValueError):
        ServiceConfig.parse("max_concurrency")


def test_peak_estimate_spells_out_its_assumptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.machine.MAX_FREQ", tmp_path / "absent")  # as in a VM: no cpufreq
    machine = Machine(
        cpu_model="Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", cpus=4, threads_per_core=2, cpu_mhz=3100.0,
        flags=["sse2", "avx2", "fma", "avx512f"],
    )  # fmt: skip
    peak = estimate_peak(machine)
    assert peak.ghz == 2.0  # the model name's nominal clock wins over the current one
    assert peak.flops_per_cycle == 16 * 2 * 2
    assert peak.gflops == pytest.approx(4 * 2.0 * 64)
    assert "assumed" in peak.assumption and "threads share a core" in peak.assumption
    older = estimate_peak(
        Machine(cpu_model="cpu", cpus=2, threads_per_core=1, cpu_mhz=1500.0, flags=["sse2", "avx"])
    )
    assert older.flops_per_cycle == 8 and older.gflops == pytest.approx(2 * 1.5 * 8)  # no FMA: 1 op/lane


def test_goal_verdicts_say_by_how_much_they_are_missed() -> None:
    assert Goal("t", 0.9, 0.95, True, "").verdict == "**met**"
    assert Goal("t", 0.9, 0.80, True, "").verdict == "**missed** by 10.0 points"
    assert Goal("o", 0.1, 0.05, False, "").verdict == "**met**"
    assert Goal("o", 0.1, 0.25, False, "").verdict == "**missed** by 15.0 points"
    assert Goal("o", 0.1, None, False, "").verdict == "not measured"


@pytest.mark.slow
def test_quick_run_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    model = write_darkness_model(tmp_path / "tiny.onnx")
    data = make_dataset(tmp_path / "data", "normalized", n=10, size=64, seed=3)
    out, results = tmp_path / "performance.md", tmp_path / "performance.json"
    command = [
        sys.executable, "-m", "bench", "--model", str(model), "--quick", "--out", str(out),
        "--json", str(results), "--batches", "1,4", "--concurrency", "1,8", "--data", str(data),
        "--checkpoint", "none", "--keras-arch", "unet", "--keras-unet-base-filters", "4",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    report = out.read_text()
    for heading in ("## Goals", "## Machine", "## 1. Raw ONNX Runtime session", "## 2. Keras against",
                    "## 3. The service's steps", "## 4. The service over HTTP", "## 5. The service's memory",
                    "## 6. Precision variants", "## 7. Floating-point work"):  # fmt: skip
        assert heading in report
    assert "**Quick run**" in report and "python -m bench --model" in report

    document = json.loads(results.read_text())
    assert [(r["batch"], r["setting"]["threads"]) for r in document["raw"]] == [(1, 0), (4, 0)]
    assert all(r["timing"]["n"] >= 3 for r in document["raw"])
    (http,) = document["http"]
    assert http["error"] is None
    assert [level["concurrency"] for level in http["levels"]] == [1, 8]
    assert all(level["latency"]["n"] >= 4 and not level["errors"] for level in http["levels"])
    assert http["memory_ready"]["rss_mib"] > 0
    variants = {v["precision"]: v for v in document["variants"]["variants"]}
    assert set(variants) == {"float32", "float16", "int8"}
    assert variants["float32"]["dice_vs_float32"] == 1.0
    assert document["keras"]["mode"] == "random" and document["keras"]["error"] is None
    assert set(document["keras"]["keras"]) == {"eager", "tf.function", "predict_on_batch"}
    assert document["flops"]["macs_by_op"] == {}
    assert len(document["goals"]) == 2 and all(goal["measured"] is not None for goal in document["goals"])

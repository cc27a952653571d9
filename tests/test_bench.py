"""The benchmark (``python -m bench``): its FLOP counter, statistics and goals by hand, and one quick run.

The benchmark is not a timed test: nothing here asserts a speed. The end-to-end run uses the tiny
"darkness" model of ``tests.onnx_models`` and a tiny random U-Net on the Keras side, in ``--quick`` mode.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image

from bench import model_cost
from bench.baseline import FullDecodePipeline, Release100Pipeline, encode_png_1_0
from bench.decode_check import DecodeCheck, PhotoCheck, dice, run_check
from bench.flops import count_flops
from bench.goals import Goal
from bench.http_load import ServiceConfig
from bench.inputs import load_photo, synthetic_photo
from bench.machine import Machine, estimate_peak
from bench.pipeline import time_side_by_side
from bench.timing import QUICK, Effort, Timing, measure, percentile
from service.imaging import encode_png, load_mask
from service.inference import OnnxModel
from service.pipeline import STEPS, Encoded, PhotoResult, Segmentation, StepTimes
from tests.conftest import make_dataset
from tests.onnx_models import write_darkness_model
from training.data import Sample

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


def test_a_service_configuration_can_load_its_own_photo() -> None:
    config = ServiceConfig.parse("6mp:photo=../data/ISIC_0012099.jpg,concurrency=1/4,requests=40")
    assert (config.name, config.photo, config.concurrency, config.requests) == (
        "6mp", Path("../data/ISIC_0012099.jpg"), (1, 4), 40,
    )  # fmt: skip
    assert config.settings == ()  # none of these reach the service's environment
    assert "DERMASEG_PHOTO" not in config.environment(Path("/m.onnx"))
    assert ServiceConfig.parse("q:query=outputs=mask").mask_only
    assert not ServiceConfig.parse("q:query=outputs=mask%2Cprobability").mask_only
    assert not ServiceConfig.parse("defaults:").mask_only
    for bad in ("concurrency=0", "requests=x", "concurrency=1/"):
        with pytest.raises(ValueError):
            ServiceConfig.parse(bad)


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
    assert Goal("r", 1.0, 1.0, False, "", unit="times").verdict == "**met**"  # "at most": the target passes
    assert Goal("r", 1.0, 1.35, False, "", unit="times").verdict == "**missed** by 0.35×"
    assert Goal("r", 1.0, 1.35, False, "", unit="times").shown == "1.35×"


# --- the reduced decode's check, and release 1.0.0's steps ------------------------------------------------


def _check(rows: list[tuple[str, float, float, float]]) -> DecodeCheck:
    return DecodeCheck(
        photos=[PhotoCheck(name, (8, 8), (4, 4), agree, full, reduced) for name, agree, full, reduced in rows]
    )


def test_dice_of_hand_drawn_masks() -> None:
    first = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    second = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=bool)
    assert dice(first, second) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0  # both empty: a perfect answer


def test_decode_check_names_the_photos_below_the_rule_and_fails() -> None:
    check = _check([("a", 0.999, 0.90, 0.91), ("b", 0.990, 0.80, 0.79), ("c", 0.9949, 0.70, 0.70)])
    assert [p.id for p in check.below] == ["b", "c"]  # worst first
    assert check.min_agreement == 0.990
    mean, half, worse, better = check.paired()
    assert mean == pytest.approx(0.0)  # +0.01, −0.01, 0
    assert half == pytest.approx(1.96 * 0.01 / 3**0.5)  # sample SD of (0.01, −0.01, 0) is 0.01
    assert (worse, better) == (1, 1)
    assert check.dice_holds and not check.passed
    assert check.verdict == "**failed**: 2 photo(s) below Dice 0.995"


def test_decode_check_fails_when_dice_against_the_experts_drops_beyond_its_interval() -> None:
    agreeing = _check([("a", 0.999, 0.90, 0.89), ("b", 0.998, 0.80, 0.79), ("c", 0.997, 0.70, 0.69)])
    assert not agreeing.below and not agreeing.dice_holds  # −0.01 on every photo: the interval is below 0
    assert agreeing.verdict.startswith("**failed**: Dice against the experts drops")
    passing = _check([("a", 0.999, 0.90, 0.90), ("b", 0.995, 0.80, 0.81)])  # 0.995 itself passes
    assert passing.passed and passing.verdict.startswith("**passed**")
    assert DecodeCheck().passed is None and DecodeCheck().verdict.startswith("not checked")


def _write_photo(path: Path, size: tuple[int, int], image_format: str = "JPEG") -> Sample:
    """A synthetic photo (a dark ellipse on skin, which the darkness model finds) and its mask."""
    data = synthetic_photo(size)
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    path.parent.mkdir(parents=True, exist_ok=True)
    if image_format == "JPEG":
        path.write_bytes(data)
    else:
        Image.fromarray(pixels).save(path, format=image_format)
    mask_path = path.with_name(path.stem + "_mask.png")
    Image.fromarray(((pixels.mean(axis=2) < 160) * 255).astype(np.uint8)).save(mask_path)
    return Sample(path.stem, path, mask_path, "synthetic")


def test_decode_check_runs_both_decodes_on_the_photos_it_acts_on(tmp_path: Path) -> None:
    model = OnnxModel(write_darkness_model(tmp_path / "tiny.onnx"))  # 64×64 input
    served = model.pipeline(batch_size=1)
    full = FullDecodePipeline(model, model.info.input_size, model.info.threshold, batch_size=1)
    samples = [
        # The reduced decode keeps twice the input: 128×128.
        _write_photo(tmp_path / "big.jpg", (512, 640)),  # decoded at 1/4: 128×160
        _write_photo(tmp_path / "half.jpg", (260, 400)),  # 1/2: 130×200
        _write_photo(tmp_path / "small.jpg", (200, 240)),  # half would be 100 < 128: full decode
        _write_photo(tmp_path / "lossless.png", (512, 640), "PNG"),  # no DCT scaling
    ]
    check = run_check(full, served, samples)
    assert check.skipped == {"too small for a reduced scale": 1, "not a JPEG": 1}
    by_id = {p.id: p for p in check.photos}
    assert set(by_id) == {"synthetic/big", "synthetic/half"}
    assert by_id["synthetic/big"].size == (512, 640) and by_id["synthetic/big"].decoded_size == (128, 160)
    assert by_id["synthetic/half"].decoded_size == (130, 200)
    for photo in check.photos:
        assert 0.98 <= photo.agreement <= 1.0  # a clear ellipse: the two masks differ only at its edge
        assert photo.dice_full > 0.8 and photo.dice_reduced > 0.8
    data = (tmp_path / "big.jpg").read_bytes()
    reference, reduced = full.run(data).segmentation.mask, served.run(data).segmentation.mask
    assert by_id["synthetic/big"].agreement == pytest.approx(dice(reference, reduced))
    truth = load_mask(samples[0].mask_path)
    assert by_id["synthetic/big"].dice_full == pytest.approx(dice(reference, truth))
    assert by_id["synthetic/big"].dice_reduced == pytest.approx(dice(reduced, truth))


def test_release_1_0_pipeline_computes_the_same_answer_the_slow_way(tmp_path: Path) -> None:
    model = OnnxModel(write_darkness_model(tmp_path / "tiny.onnx"))
    served = model.pipeline(batch_size=1)
    before = Release100Pipeline(model, model.info.input_size, model.info.threshold, batch_size=1)
    data = synthetic_photo((480, 640))
    old, new = before.run(data, probability=True), served.run(data, probability=True)
    assert tuple(old.times.ms) == tuple(new.times.ms) == STEPS  # timed by the same Pipeline.run
    assert old.segmentation.mask.shape == new.segmentation.mask.shape == (480, 640)
    assert dice(old.segmentation.mask, new.segmentation.mask) > 0.98
    for png in (old.encoded.mask_png, old.encoded.probability_png):
        assert png is not None and Image.open(io.BytesIO(png)).size == (640, 480)
    mask = new.segmentation.mask
    # Both encoders are lossless: 1.0.0's Pillow PNG and the served OpenCV one hold the same pixels.
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(encode_png_1_0(mask, 1)))),
        np.asarray(Image.open(io.BytesIO(encode_png(mask, 1)))),
    )


def test_steps_are_timed_side_by_side_round_after_round() -> None:
    order: list[str] = []

    def call(name: str, decode_ms: float) -> PhotoResult:
        order.append(name)
        times = StepTimes()
        times.ms = {"decode": decode_ms, "inference": 1.0}
        empty = Segmentation(np.zeros((1, 1), bool), np.zeros((1, 1), np.float32), 0.5)
        return PhotoResult(empty, Encoded(), times)

    effort = Effort(
        warmup=1, min_runs=3, max_runs=3, seconds=0.0, http_requests=1, http_seconds=1.0,
        validation_images=1, calibration_images=1,
    )  # fmt: skip
    timings, last = time_side_by_side({"a": lambda: call("a", 5.0), "b": lambda: call("b", 2.0)}, effort)
    assert order == ["a", "b"] * 4  # one warm-up round, then 3 timed rounds, alternating
    assert timings["a"]["decode"].samples_ms == [5.0, 5.0, 5.0]
    assert timings["b"]["decode"].p50 == 2.0 and timings["b"]["inference"].n == 3
    assert set(last) == {"a", "b"}


@pytest.mark.slow
def test_quick_run_end_to_end_on_a_tiny_model(tmp_path: Path) -> None:
    model = write_darkness_model(tmp_path / "tiny.onnx")
    data = make_dataset(tmp_path / "data", "normalized", n=10, size=64, seed=3)
    checkable = make_dataset(tmp_path / "checkable", "normalized", n=3, size=(256, 384), seed=4)
    large = tmp_path / "ISIC_0012099.jpg"  # the 6 MP goal's name, at a size a test can afford
    large.write_bytes(synthetic_photo((600, 800)))
    out, results = tmp_path / "performance.md", tmp_path / "performance.json"
    command = [
        sys.executable, "-m", "bench", "--model", str(model), "--quick", "--out", str(out),
        "--json", str(results), "--batches", "1,4", "--concurrency", "1,8", "--data", str(data),
        "--checkpoint", "none", "--keras-arch", "unet", "--keras-unet-base-filters", "4",
        "--large-photos", f"{large},{tmp_path / 'absent.jpg'}", "--decode-check-data", str(checkable),
        "--service", "defaults:", "--service", f"6mp:photo={large},concurrency=1,requests=4",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    report = out.read_text()
    for heading in ("## Goals", "## Machine", "## 1. Raw ONNX Runtime session", "## 2. Keras against",
                    "## 3. The service's steps", "## 4. The service over HTTP", "## 5. The service's memory",
                    "## 6. Precision variants", "## 7. Floating-point work", "## 8. Reduced-scale JPEG",
                    "### Large photos at concurrency 1"):  # fmt: skip
        assert heading in report
    assert "absent.jpg not found" in report and "before (1.0.0)" in report
    assert "**Quick run**" in report and "python -m bench --model" in report

    document = json.loads(results.read_text())
    assert [(r["batch"], r["setting"]["threads"]) for r in document["raw"]] == [(1, 0), (4, 0)]
    assert all(r["timing"]["n"] >= 3 for r in document["raw"])
    http, large_http = document["http"]
    assert http["error"] is None and large_http["error"] is None
    assert [level["concurrency"] for level in large_http["levels"]] == [1]
    assert [p["size"] for p in document["pipeline"]["photos"]] == [[768, 1024], [600, 800]]
    assert all(p["before"]["steps"]["encode"]["n"] >= 3 for p in document["pipeline"]["photos"])
    assert len(document["decode_check"]["photos"]) == 3  # 256×384 JPEGs decode at 1/2 (2× a 64×64 input)
    assert [level["concurrency"] for level in http["levels"]] == [1, 8]
    assert all(level["latency"]["n"] >= 4 and not level["errors"] for level in http["levels"])
    assert http["memory_ready"]["rss_mib"] > 0
    variants = {v["precision"]: v for v in document["variants"]["variants"]}
    assert set(variants) == {"float32", "float16", "int8"}
    assert variants["float32"]["dice_vs_float32"] == 1.0
    assert document["keras"]["mode"] == "random" and document["keras"]["error"] is None
    assert set(document["keras"]["keras"]) == {"eager", "tf.function", "predict_on_batch"}
    assert document["flops"]["macs_by_op"] == {}
    assert [goal["target"] for goal in document["goals"]] == [0.80, 1.0]  # full JSON throughput; 6 MP ratio
    assert all(goal["measured"] is not None for goal in document["goals"])


def test_model_cost_times_both_models_on_every_photo_and_step(tmp_path: Path) -> None:
    small = write_darkness_model(tmp_path / "small.onnx", input_size=(32, 32), version="1.0.0")
    large = write_darkness_model(tmp_path / "large.onnx", input_size=(96, 128), version="2.0.0")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(synthetic_photo((120, 160)))
    out = tmp_path / "cost.json"
    assert (
        model_cost.main([str(small), str(large), "--photos", str(photo), "--quick", "--json", str(out)]) == 0
    )

    (result,) = json.loads(out.read_text())
    assert set(result["models"]) == {"1.0.0 (32×32)", "2.0.0 (128×96)"}
    for steps in result["models"].values():
        assert set(steps) == set(STEPS)
        assert all(timing["n"] >= QUICK.min_runs for timing in steps.values())


def test_model_cost_tells_two_files_of_the_same_release_apart(tmp_path: Path) -> None:
    path = write_darkness_model(tmp_path / "model.onnx")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(synthetic_photo((60, 80)))
    model = OnnxModel(path)
    (cost,) = model_cost.compare(model, OnnxModel(path), [load_photo(photo)], QUICK)
    a, b = cost.steps
    assert a.startswith("A ") and b.startswith("B ") and a != b
    whole = cost.p50(a)
    assert whole == pytest.approx(sum(cost.p50(a, step) for step in STEPS))
    text = model_cost.render([cost])
    assert text.count("**whole answer**") == 1 and "B / A" in text

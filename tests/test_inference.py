"""The inference core: post-processing, measurements, the Pipeline, OnnxModel and `dermaseg predict`."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from service.inference import ModelLoadError, OnnxModel
from service.pipeline import (
    STEPS,
    Encoded,
    Pipeline,
    Segmentation,
    StepTimes,
    keep_largest_component,
    postprocess,
    preprocess,
)

REPO = Path(__file__).resolve().parents[1]


def darkness(batch: np.ndarray) -> np.ndarray:
    """A stand-in network: the darker a pixel, the likelier lesion; ``(N, h, w, 1)``."""
    return (1.0 - batch.mean(axis=-1, keepdims=True) / 255.0).astype(np.float32)


def dark_square_photo(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """White photo with a black rectangle ``(x, y, width, height)``."""
    photo = np.full((height, width, 3), 255, np.uint8)
    x, y, w, h = box
    photo[y : y + h, x : x + w] = 0
    return photo


def write_darkness_model(
    path: Path,
    *,
    size: tuple[int, int] | None = (32, 32),
    metadata: dict[str, str] | None = None,
    two_inputs: bool = False,
) -> Path:
    """An ONNX model of :func:`darkness`: ``image`` (N, H, W, 3) → ``probability`` (N, H, W, 1)."""
    height, width = size if size is not None else ("H", "W")
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", height, width, 3])
    probability = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", height, width, 1])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[3], keepdims=1),
        helper.make_node("Mul", ["mean", "scale"], ["scaled"]),
        helper.make_node("Sub", ["one", "scaled"], ["probability"]),
    ]
    initializers = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0 / 255.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
    ]
    inputs = [image]
    if two_inputs:
        inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(nodes, "darkness", inputs, [probability], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


DARKNESS_METADATA = {
    "dermaseg.name": "darkness",
    "dermaseg.version": "9.9.9",
    "dermaseg.input_size": "32x32",
    "dermaseg.threshold": "0.4",
    "dermaseg.card": json.dumps({"intended_use": "research use, not for diagnosis", "precision": "float32"}),
}


@pytest.fixture
def darkness_model(tmp_path: Path) -> Path:
    return write_darkness_model(tmp_path / "darkness.onnx", metadata=DARKNESS_METADATA)


# --- postprocess --------------------------------------------------------------------------------------------


def test_postprocess_brings_the_probability_back_to_the_photo_size():
    probability = np.zeros((4, 4, 1), np.float32)
    probability[:2, :2] = 1.0
    result = postprocess(probability, (8, 12), 0.5)
    assert result.probability.shape == (8, 12)
    assert result.mask.shape == (8, 12)
    assert result.mask.dtype == bool
    assert result.mask[0, 0] and not result.mask[-1, -1]
    assert result.threshold == 0.5


def test_threshold_is_inclusive():
    probability = np.full((4, 4), 0.5, np.float32)
    assert postprocess(probability, (4, 4), 0.5).mask.all()
    assert not postprocess(probability, (4, 4), 0.5001).mask.any()


def test_keep_largest_component_keeps_the_biggest_eight_connected_region():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:2] = True  # 4 pixels
    mask[5:8, 5:8] = True  # 9 pixels
    mask[2, 2] = True  # touches the small one diagonally: 5 pixels, still smaller
    kept = keep_largest_component(mask)
    assert kept.sum() == 9
    assert kept[5:8, 5:8].all() and not kept[0:3, 0:3].any()

    diagonal = np.eye(4, dtype=bool)  # one region under 8-connectivity
    assert (keep_largest_component(diagonal) == diagonal).all()
    empty = np.zeros((3, 3), bool)
    assert not keep_largest_component(empty).any()


def test_postprocess_options_remove_specks_and_fill_holes():
    probability = np.zeros((10, 10), np.float32)
    probability[1:8, 1:8] = 1.0
    probability[3:5, 3:5] = 0.0  # a hole
    probability[9, 9] = 1.0  # a speck
    plain = postprocess(probability, (10, 10), 0.5)
    assert plain.mask[9, 9] and not plain.mask[3, 3]
    cleaned = postprocess(probability, (10, 10), 0.5, largest_component=True, fill_holes=True)
    assert not cleaned.mask[9, 9]
    assert cleaned.mask[1:8, 1:8].all()
    assert cleaned.area_px == 49


# --- Segmentation measurements ------------------------------------------------------------------------------


def test_segmentation_measures_a_hand_drawn_mask():
    mask = np.zeros((6, 10), bool)
    mask[2:5, 3:7] = True  # rows 2–4, columns 3–6: 12 pixels
    mask[1, 8] = True  # and one more, widening the box
    result = Segmentation(mask=mask, probability=mask.astype(np.float32), threshold=0.5)
    assert result.found
    assert result.area_px == 13
    assert result.area_fraction == pytest.approx(13 / 60)
    assert result.bbox == (3, 1, 6, 4)  # x, y, width, height
    assert result.area_mm2(0.1) == pytest.approx(0.13)
    assert result.area_mm2(None) is None


def test_segmentation_of_nothing():
    empty = np.zeros((4, 4), bool)
    result = Segmentation(mask=empty, probability=empty.astype(np.float32), threshold=0.5)
    assert not result.found
    assert result.area_px == 0
    assert result.area_fraction == 0.0
    assert result.bbox is None
    assert result.area_mm2(0.2) == 0.0


# --- Pipeline -----------------------------------------------------------------------------------------------


def test_preprocess_resizes_to_the_network_input_as_float32_0_to_255():
    batch = preprocess(dark_square_photo(30, 50, (0, 0, 10, 10)), (16, 24))
    assert batch.shape == (16, 24, 3)
    assert batch.dtype == np.float32
    assert batch.min() == 0.0 and batch.max() == 255.0


def test_pipeline_finds_a_dark_square_at_the_photo_size_in_batches():
    calls: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return darkness(batch)

    pipeline = Pipeline(predict, (32, 32), threshold=0.5, batch_size=2)
    photos = [dark_square_photo(64, 96, (16, 16, 32, 32)) for _ in range(3)]
    results = pipeline.segment(photos)

    assert calls == [2, 1]
    for result in results:
        assert result.mask.shape == (64, 96)
        x, y, width, height = result.bbox
        assert abs(x - 16) <= 2 and abs(y - 16) <= 2
        assert abs(width - 32) <= 4 and abs(height - 32) <= 4
    # A threshold given to segment() wins over the default.
    assert not pipeline.segment(photos[:1], threshold=1.01)[0].found


def test_flip_tta_realigns_the_flipped_predictions():
    # A network that is not flip-equivariant: darkness weighted by a left-to-right ramp fixed in network
    # coordinates. Flipping the input, predicting and flipping back gives darkness × the mirrored ramp; the
    # vertical flip leaves a horizontal ramp unchanged. So TTA = darkness × (2·ramp + mirrored ramp) / 3.
    height, width = 8, 12
    ramp = np.linspace(0.1, 1.0, width, dtype=np.float32)[None, None, :, None]

    def predict(batch: np.ndarray) -> np.ndarray:
        return darkness(batch) * ramp

    batch = np.random.default_rng(0).uniform(0, 255, (2, height, width, 3)).astype(np.float32)
    pipeline = Pipeline(predict, (height, width))

    plain = pipeline.infer(batch)
    averaged = pipeline.infer(batch, flip_tta=True)

    dark = darkness(batch)[..., 0]
    assert plain.shape == averaged.shape == (2, height, width)
    np.testing.assert_allclose(plain, dark * ramp[..., 0], rtol=1e-6)
    np.testing.assert_allclose(averaged, dark * (2 * ramp[..., 0] + ramp[..., ::-1, 0]) / 3, rtol=1e-5)


def test_flip_tta_changes_nothing_for_a_flip_equivariant_network():
    batch = np.random.default_rng(1).uniform(0, 255, (1, 6, 6, 3)).astype(np.float32)
    pipeline = Pipeline(darkness, (6, 6))
    np.testing.assert_allclose(pipeline.infer(batch, flip_tta=True), pipeline.infer(batch), rtol=1e-6)


def test_pipeline_run_times_every_step_and_matches_segment():
    photo = dark_square_photo(40, 60, (10, 5, 20, 15))
    data = io.BytesIO()
    Image.fromarray(photo).save(data, format="PNG")
    pipeline = Pipeline(darkness, (16, 16), threshold=0.5)

    result = pipeline.run(data.getvalue(), mask=True, probability=True)

    assert list(result.times.ms) == list(STEPS)
    assert all(ms >= 0.0 for ms in result.times.ms.values())
    (batched,) = pipeline.segment([photo])
    assert (result.height, result.width) == (40, 60)
    np.testing.assert_array_equal(result.segmentation.mask, batched.mask)
    with Image.open(io.BytesIO(result.encoded.mask_png or b"")) as mask_png:
        np.testing.assert_array_equal(np.asarray(mask_png) == 255, batched.mask)
    with Image.open(io.BytesIO(result.encoded.probability_png or b"")) as probability_png:
        assert probability_png.size == (60, 40)
    # Only what was asked for is encoded.
    assert pipeline.run(data.getvalue(), mask=False).encoded == Encoded()


def test_step_times_add_up_over_batches():
    times = StepTimes()
    pipeline = Pipeline(darkness, (8, 8), batch_size=1)
    pipeline.segment([dark_square_photo(8, 8, (0, 0, 4, 4))] * 3, times=times)
    assert set(times.ms) == {"preprocess", "inference", "postprocess"}


# --- OnnxModel ----------------------------------------------------------------------------------------------


def test_onnx_model_reads_its_metadata(darkness_model: Path):
    model = OnnxModel(darkness_model)
    assert model.info.name == "darkness"
    assert model.info.version == "9.9.9"
    assert model.info.input_size == (32, 32)
    assert model.info.threshold == pytest.approx(0.4)
    assert model.info.card["intended_use"] == "research use, not for diagnosis"
    assert model.info.metadata["dermaseg.name"] == "darkness"
    assert model.providers == ["CPUExecutionProvider"]
    assert (model.input_name, model.output_name) == ("image", "probability")


def test_onnx_model_thread_settings_reach_the_session(darkness_model: Path):
    from service.inference import SPINNING_CONFIG_KEY

    for spinning, entry in ((True, "1"), (False, "0")):
        model = OnnxModel(darkness_model, intra_op_threads=1, thread_spinning=spinning)
        options = model.session.get_session_options()
        assert options.get_session_config_entry(SPINNING_CONFIG_KEY) == entry
        assert options.intra_op_num_threads == 1
    options = OnnxModel(darkness_model).session.get_session_options()
    with pytest.raises(Exception, match="does not have configuration"):  # left to ONNX Runtime's default
        options.get_session_config_entry(SPINNING_CONFIG_KEY)


def test_onnx_model_runs_any_batch_size(darkness_model: Path):
    model = OnnxModel(darkness_model)
    for count in (1, 3):
        batch = np.full((count, 32, 32, 3), 51.0, np.float32)
        output = model(batch)
        assert output.shape == (count, 32, 32, 1)
        assert output.dtype == np.float32
        np.testing.assert_allclose(output, 0.8, rtol=1e-6)


def test_onnx_model_pipeline_uses_the_model_threshold_and_size(darkness_model: Path):
    pipeline = OnnxModel(darkness_model).pipeline(batch_size=4)
    assert pipeline.input_size == (32, 32)
    assert pipeline.threshold == pytest.approx(0.4)
    photo = dark_square_photo(48, 80, (20, 8, 40, 32))
    result = pipeline.segment([photo])[0]
    assert result.mask.shape == (48, 80)
    assert result.bbox == pytest.approx((20, 8, 40, 32), abs=3)


def test_without_metadata_the_size_comes_from_the_graph(tmp_path: Path):
    model = OnnxModel(write_darkness_model(tmp_path / "plain.onnx", size=(16, 24)))
    assert model.info.input_size == (16, 24)
    assert model.info.name == "plain"
    assert model.info.version == "unversioned"
    assert model.info.threshold == 0.5
    assert model.info.card == {}


def test_missing_cuda_falls_back_to_cpu_unless_required(darkness_model: Path):
    assert OnnxModel(darkness_model, providers=["cuda", "cpu"]).providers == ["CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match="CUDAExecutionProvider"):
        OnnxModel(darkness_model, providers=["cuda"], require_providers=True)


def test_missing_model_file(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxModel(tmp_path / "nothing.onnx")


def test_corrupt_model_file(tmp_path: Path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match="cannot load"):
        OnnxModel(path)


def test_models_that_break_the_contract_are_refused(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="not a DermaSeg model"):
        OnnxModel(write_darkness_model(tmp_path / "two.onnx", two_inputs=True))
    with pytest.raises(ModelLoadError, match="input size"):
        OnnxModel(write_darkness_model(tmp_path / "dynamic.onnx", size=None))
    bad_threshold = {**DARKNESS_METADATA, "dermaseg.threshold": "half"}
    with pytest.raises(ModelLoadError, match="threshold"):
        OnnxModel(write_darkness_model(tmp_path / "bad.onnx", metadata=bad_threshold))


# --- dermaseg predict ---------------------------------------------------------------------------------------


def predict_args(images: list[Path], out: Path, model: Path | None, **options) -> Namespace:
    defaults = {
        "providers": ["cpu"],
        "pixel_spacing": None,
        "threshold": None,
        "flip_tta": False,
        "largest_component": False,
        "fill_holes": False,
    }
    return Namespace(images=images, out=out, model=model, **{**defaults, **options})


def test_predict_without_a_model_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import training.predict

    monkeypatch.setattr(training.predict, "DEFAULT_MODEL", tmp_path / "models" / "dermaseg.onnx")
    with pytest.raises(ModelLoadError, match=r"dermaseg\.onnx"):
        training.predict.predict_cli(predict_args([], tmp_path / "out", None))


def test_predict_writes_masks_probabilities_and_a_summary(tmp_path: Path, darkness_model: Path):
    from training.predict import predict_cli

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(dark_square_photo(40, 60, (10, 10, 20, 16))).save(photos / "lesion.png")
    Image.fromarray(np.full((20, 20, 3), 255, np.uint8)).save(photos / "clear.jpg", quality=95)
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(dark_square_photo(30, 30, (0, 0, 10, 10))).save(other / "lesion.bmp")  # same stem
    out = tmp_path / "out"

    args = predict_args([photos, other / "lesion.bmp"], out, darkness_model, pixel_spacing=0.5)
    assert predict_cli(args) == 0

    summary = json.loads((out / "predictions.json").read_text())
    assert summary["model"]["name"] == "darkness"
    assert summary["threshold"] == pytest.approx(0.4)
    by_file = {Path(entry["file"]).name: entry for entry in summary["images"]}
    assert set(by_file) == {"lesion.png", "clear.jpg", "lesion.bmp"}
    lesion = by_file["lesion.png"]
    assert lesion["size"] == {"width": 60, "height": 40}
    assert lesion["found"] and lesion["providers"] == ["CPUExecutionProvider"]
    assert lesion["bbox"] == pytest.approx({"x": 10, "y": 10, "width": 20, "height": 16}, abs=2)
    assert lesion["area_mm2"] == pytest.approx(lesion["area_px"] * 0.25)
    assert lesion["area_fraction"] == pytest.approx(lesion["area_px"] / 2400, abs=1e-6)
    assert not by_file["clear.jpg"]["found"] and by_file["clear.jpg"]["bbox"] is None
    assert by_file["lesion.bmp"]["mask"] == "lesion_2_mask.png"  # not overwritten

    with Image.open(out / "lesion_mask.png") as mask_image:
        mask = np.asarray(mask_image)
    assert mask.shape == (40, 60)
    assert set(np.unique(mask)) == {0, 255}
    assert int((mask == 255).sum()) == lesion["area_px"]
    with Image.open(out / "lesion_probability.png") as probability_image:
        assert probability_image.mode == "L"
        probability = np.asarray(probability_image)
    assert probability.shape == (40, 60)
    assert probability[15, 15] == 255 and probability[0, 0] == 0


def test_predict_cli_end_to_end_skips_bad_photos_without_tensorflow(tmp_path: Path, darkness_model: Path):
    good = tmp_path / "good.png"
    Image.fromarray(dark_square_photo(40, 40, (8, 8, 16, 16))).save(good)
    bad = tmp_path / "bad-photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff this is not really a JPEG")
    out = tmp_path / "out"
    script = (
        "import json, sys\n"
        "from training.cli import main\n"
        f"code = main(['predict', {str(good)!r}, {str(bad)!r}, '--out', {str(out)!r},"
        f" '--model', {str(darkness_model)!r}, '--fill-holes', '--flip-tta'])\n"
        "heavy = sorted(name for name in ('tensorflow', 'keras', 'tf2onnx') if name in sys.modules)\n"
        "print('RESULT ' + json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.split("RESULT ", 1)[1])
    assert result == {"code": 1, "heavy": []}
    assert "bad-photo.jpg" in completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
    assert (out / "good_mask.png").is_file() and (out / "good_probability.png").is_file()
    assert not (out / "bad-photo_mask.png").exists()
    summary = json.loads((out / "predictions.json").read_text())
    assert [Path(entry["file"]).name for entry in summary["images"]] == ["good.png"]
    assert summary["failed"][0]["code"] == "undecodable_image"
    assert summary["postprocess"] == {"flip_tta": True, "largest_component": False, "fill_holes": True}

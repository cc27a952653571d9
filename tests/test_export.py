"""`dermaseg export`: the real network at 64×64 through tf2onnx, its checks, variants, card and Triton layout.

The slow tests share one export (module-scoped): a ResNet50V2 U-Net with random weights, batch-norm
statistics perturbed so that no layer is an identity, and the head's bias set so that the probabilities
straddle the threshold (so the masks, and the variants' Dice against them, are not trivially empty).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.imaging import decode_image
from service.inference import OnnxModel
from service.pipeline import preprocess
from tests.conftest import make_dataset, make_lesion
from training.export import (
    MAX_OPSET,
    MIN_OPSET,
    PARITY_TOLERANCE,
    ExportError,
    apply_contract_names,
    as_float32,
    export_model,
    triton_config,
    write_float16_storage,
)

SIZE = 64
#: A narrow decoder keeps the test quick; the encoder is the full ResNet50V2.
DECODER = (64, 32, 32, 16, 16)
SHIPPED = "int8"


def build_test_model() -> Any:
    import keras

    from training.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(
        "resnet50v2-unet", input_size=(SIZE, SIZE), encoder_weights=None, decoder_filters=DECODER
    )
    generator = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(generator.normal(0.0, 0.2, shape).astype("float32"))
            layer.moving_variance.assign(generator.uniform(0.5, 2.0, shape).astype("float32"))
            layer.gamma.assign(generator.uniform(0.8, 1.2, shape).astype("float32"))
            layer.beta.assign(generator.normal(0.0, 0.1, shape).astype("float32"))
    # Centre the logits on zero over lesion-like photos: half the pixels above the threshold.
    photos = np.stack([make_lesion(SIZE, seed)[0] for seed in range(4)]).astype("float32")
    probability = np.asarray(keras.ops.convert_to_numpy(model(photos, training=False)), dtype=np.float64)
    probability = np.clip(probability, 1e-6, 1 - 1e-6)
    head = model.get_layer("probability")
    kernel, bias = head.get_weights()
    bias = bias - np.median(np.log(probability / (1 - probability)))
    head.set_weights([kernel, bias.astype("float32")])
    return model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def dataset(workspace: Path) -> Path:
    """16 synthetic lesion photos of 72 × 88 (not the network's size, so resizing is exercised)."""
    return make_dataset(workspace / "data", "normalized", n=16, size=(72, 88), seed=10)


@pytest.fixture(scope="module")
def checkpoint(workspace: Path, dataset: Path) -> Path:
    """A run folder as `dermaseg train` leaves it: best.keras, config.json, split.json, an evaluation."""
    from training.config import TrainConfig
    from training.data import load_samples
    from training.split import save_split

    run_dir = workspace / "run"
    run_dir.mkdir()
    model = build_test_model()
    model.save(run_dir / "best.keras")
    TrainConfig(
        data=[str(dataset)],
        out=str(run_dir),
        encoder_weights="none",
        decoder_filters=DECODER,
        image_size=SIZE,
    ).save(run_dir / "config.json")
    samples = load_samples([dataset])
    save_split(run_dir / "split.json", samples[4:], samples[:4], seed=42, val_fraction=0.25)
    evaluation = {
        "n_images": 4,
        "mean": {"dice": 0.5},
        "data": [f"validation split of {run_dir / 'split.json'}"],
        "date": "2025-01-01T00:00:00+00:00",
        "per_image": [{"id": "SYN_0000", "dice": 0.5}],
    }
    (run_dir / "eval_val.json").write_text(json.dumps(evaluation))
    return run_dir / "best.keras"


@pytest.fixture(scope="module")
def exported(workspace: Path, checkpoint: Path, dataset: Path) -> dict[str, Any]:
    """One export with both variants, int8 shipped, and a Triton repository."""
    out = workspace / "models" / "dermaseg.onnx"
    card = export_model(
        checkpoint,
        out,
        name="dermaseg-test",
        version="1.2.3",
        variants=("float16", "int8"),
        ship=SHIPPED,
        calibration_roots=(dataset,),
        triton_dir=workspace / "triton",
    )
    return {"card": card, "out": out, "triton": workspace / "triton"}


def keras_predict(checkpoint: Path, batch: np.ndarray) -> np.ndarray:
    import keras

    model = keras.models.load_model(checkpoint, compile=False)
    return np.asarray(keras.ops.convert_to_numpy(model(batch, training=False)), dtype=np.float32)


# --- the export ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_writes_the_shipped_model_its_variants_and_the_card(exported):
    folder = exported["out"].parent
    assert sorted(path.name for path in folder.iterdir()) == [
        "dermaseg.fp16.onnx",
        "dermaseg.fp32.onnx",
        "dermaseg.json",
        "dermaseg.onnx",
    ]  # and no temporary folder left behind
    card = exported["card"]
    assert card["precision"] == SHIPPED
    assert card["file"] == "dermaseg.onnx"
    assert {name: variant["file"] for name, variant in card["variants"].items()} == {
        "float32": "dermaseg.fp32.onnx",
        "float16": "dermaseg.fp16.onnx",
        "int8": "dermaseg.onnx",
    }


@pytest.mark.slow
def test_keras_and_onnx_runtime_agree(exported, checkpoint, dataset):
    verification = exported["card"]["export"]["verification"]
    assert verification["max_abs_diff"] <= PARITY_TOLERANCE
    assert {"random batch 1", "random batch 3"} <= set(verification["per_input"])

    # Checked again here, on photos and noise the export did not see.
    photos = [decode_image(path) for path in sorted((dataset / "images").iterdir())[-3:]]
    batch = np.concatenate(
        [
            np.stack([preprocess(photo, (SIZE, SIZE)) for photo in photos]),
            np.random.default_rng(7).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32),
        ]
    )
    expected = keras_predict(checkpoint, batch)
    assert 0.05 < expected.mean() < 0.95 and expected.std() > 1e-3  # not a constant network
    got = OnnxModel(exported["out"].with_name("dermaseg.fp32.onnx"))(batch)
    assert np.max(np.abs(got - expected)) <= PARITY_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("file_name", ["dermaseg.fp32.onnx", "dermaseg.fp16.onnx", "dermaseg.onnx"])
def test_io_contract_and_dynamic_batch(exported, file_name):
    path = exported["out"].with_name(file_name)
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    assert opsets[""] >= MIN_OPSET

    (graph_input,) = proto.graph.input
    (graph_output,) = proto.graph.output
    for value, name, channels in ((graph_input, "image", 3), (graph_output, "probability", 1)):
        assert value.name == name
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "N" and not dims[0].HasField("dim_value")
        assert [dim.dim_value for dim in dims[1:]] == [SIZE, SIZE, channels]

    model = OnnxModel(path)
    for count in (1, 3):
        batch = np.random.default_rng(count).uniform(0, 255, (count, SIZE, SIZE, 3)).astype(np.float32)
        output = model(batch)
        assert output.shape == (count, SIZE, SIZE, 1)
        assert output.dtype == np.float32
        assert ((output >= 0) & (output <= 1)).all()


@pytest.mark.slow
def test_metadata_round_trip_and_sidecar_hash(exported):
    out = exported["out"]
    sidecar = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar == exported["card"]
    assert sidecar["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    for variant in sidecar["variants"].values():
        file_bytes = out.with_name(variant["file"]).read_bytes()
        assert variant["sha256"] == hashlib.sha256(file_bytes).hexdigest()

    info = OnnxModel(out).info
    assert (info.name, info.version, info.input_size, info.threshold) == (
        "dermaseg-test",
        "1.2.3",
        (64, 64),
        0.5,
    )
    assert info.metadata["dermaseg.input_size"] == "64x64"
    embedded = info.card
    assert "sha256" not in embedded  # a file cannot hold its own hash
    assert embedded["precision"] == SHIPPED
    without_hashes = json.loads(json.dumps(sidecar))
    for key in ("sha256", "file"):
        without_hashes.pop(key)
    for variant in without_hashes["variants"].values():
        variant.pop("sha256")
    assert embedded == without_hashes
    assert OnnxModel(out.with_name("dermaseg.fp16.onnx")).info.card["precision"] == "float16"


@pytest.mark.slow
def test_card_describes_the_model_its_training_and_its_making(exported, dataset):
    card = exported["card"]
    assert card["intended_use"] == "research use, not for diagnosis"
    (terms,) = card["data_terms"].values()  # a synthetic dataset: its terms are not known
    assert terms.startswith("unknown")
    assert card["input_size"] == "64x64" and card["threshold"] == 0.5
    assert card["normalization"] == "RGB 0–255 float32; the network rescales internally x/127.5−1"
    assert card["input"]["shape"] == ["N", 64, 64, 3] and card["output"]["name"] == "probability"
    assert card["created"].startswith("20")

    training = card["training"]
    assert training["config"]["decoder_filters"] == list(DECODER)
    assert training["data"]["roots"] == [str(dataset)]
    assert (training["data"]["train_count"], training["data"]["val_count"]) == (12, 4)
    assert len(training["data"]["val_ids"]) == 4 and training["data"]["val_ids"][0].endswith("/SYN_0000")

    (evaluation,) = card["evaluation"]
    assert evaluation["file"] == "eval_val.json"
    assert evaluation["date"] == "2025-01-01T00:00:00+00:00" and evaluation["data"]
    assert "per_image" not in evaluation

    export = card["export"]
    assert export["converter"] == "tf2onnx" and export["opset"] == 17
    assert set(export["tools"]) >= {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"}
    assert export["git_commit"]
    photos = export["photos"]
    # The run's validation images judge the variants; int8 is calibrated on the other twelve.
    assert (photos["evaluation_count"], photos["calibration_count"], photos["disjoint"]) == (4, 12, True)
    assert "split.json" in photos["evaluation_source"]


@pytest.mark.slow
def test_variants_are_smaller_and_measured(exported):
    variants = exported["card"]["variants"]
    sizes = {name: variant["size_bytes"] for name, variant in variants.items()}
    assert 0.45 < sizes["float16"] / sizes["float32"] < 0.55
    assert sizes["int8"] < 0.35 * sizes["float32"]
    for variant in variants.values():
        assert variant["latency_ms_batch1"] > 0
        assert variant["n_images"] == 4
        assert 0.0 <= variant["dice_vs_truth"] <= 1.0
    assert variants["float32"]["dice_vs_float32"] == 1.0
    # Float16 storage is float32 arithmetic on rounded weights: masks all but identical.
    assert variants["float16"]["dice_vs_float32"] >= 0.98
    assert variants["float16"]["max_abs_diff_vs_float32"] < 1e-2
    assert 0.0 <= variants["int8"]["dice_vs_float32"] <= 1.0


@pytest.mark.slow
def test_variants_load_and_segment(exported):
    photo, _ = make_lesion((90, 120), seed=99)
    masks = {}
    for file_name in ("dermaseg.fp32.onnx", "dermaseg.fp16.onnx", "dermaseg.onnx"):
        model = OnnxModel(exported["out"].with_name(file_name))
        (result,) = model.pipeline().segment([photo])
        assert result.mask.shape == (90, 120)
        masks[file_name] = result.mask
    overlap = (masks["dermaseg.fp16.onnx"] == masks["dermaseg.fp32.onnx"]).mean()
    assert overlap > 0.99


@pytest.mark.slow
def test_int8_is_quantized_but_keeps_a_float_probability_head(exported):
    proto = onnx.load(str(exported["out"]))
    op_types = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types
    producers = {output: node for node in proto.graph.node for output in node.output}
    float_weights = {init.name for init in proto.graph.initializer if init.data_type == TensorProto.FLOAT}
    # From the output back to the last convolution: no quantization, and the convolution's weights float.
    node = producers["probability"]
    path = [node.op_type]
    while node.op_type != "Conv":
        node = producers[node.input[0]]
        path.append(node.op_type)
    assert "Sigmoid" in path
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(path)
    assert node.input[1] in float_weights


@pytest.mark.slow
def test_float16_variant_stores_half_precision_weights(exported):
    proto = onnx.load(str(exported["out"].with_name("dermaseg.fp16.onnx")))
    large = [init for init in proto.graph.initializer if np.prod(init.dims) >= 1024]
    assert large and all(init.data_type == TensorProto.FLOAT16 for init in large)
    assert sum(node.op_type == "Cast" for node in proto.graph.node) >= len(large)


@pytest.mark.slow
def test_triton_repository(exported):
    model_dir = exported["triton"] / "dermaseg"
    assert (model_dir / "1" / "model.onnx").read_bytes() == exported["out"].read_bytes()
    config = (model_dir / "config.pbtxt").read_text()
    assert config == triton_config((SIZE, SIZE))
    for line in (
        'name: "dermaseg"',
        'platform: "onnxruntime_onnx"',
        "max_batch_size: 16",
        'name: "image"',
        'name: "probability"',
        "data_type: TYPE_FP32",
        "dims: [ 64, 64, 3 ]",
        "dims: [ 64, 64, 1 ]",
        "preferred_batch_size: [ 4, 8, 16 ]",
        "max_queue_delay_microseconds: 2000",
    ):
        assert line in config


@pytest.mark.slow
def test_shipping_a_precision_too_large_fails_before_converting(checkpoint, tmp_path):
    with pytest.raises(ExportError, match="do not fit") as caught:
        export_model(checkpoint, tmp_path / "big.onnx", ship="float32", max_bytes=2**20)
    assert "float16" in str(caught.value) and "int8" in str(caught.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_end_to_end(checkpoint, tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "cli" / "model.onnx"
    # The test network's float32 file (~93 MiB) is over the shipping limit: lift it (an evaluation export).
    arguments = ["--checkpoint", str(checkpoint), "--out", str(out), "--version", "2.0.0"]
    code = main(["export", *arguments, "--max-size-mib", "0"])
    assert code == 0
    assert "model.onnx" in capsys.readouterr().out
    info = OnnxModel(out).info
    assert (info.name, info.version) == ("model", "2.0.0")
    card = json.loads(out.with_suffix(".json").read_text())
    assert list(card["variants"]) == ["float32"]
    assert card["variants"]["float32"]["dice_vs_float32"] is None  # no photos given


# --- argument checks (fast: they fail before TensorFlow loads) ----------------------------------------------


@pytest.fixture
def fake_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "run" / "best.keras"
    path.parent.mkdir()
    path.write_bytes(b"never loaded: the arguments are checked first")
    return path


def test_missing_checkpoint(tmp_path: Path):
    with pytest.raises(ExportError, match="checkpoint not found"):
        export_model(tmp_path / "nothing.keras", tmp_path / "model.onnx")


@pytest.mark.parametrize("options", [{"variants": ("int8",)}, {"ship": "int8"}])
def test_int8_without_calibration_photos_is_refused(fake_checkpoint: Path, tmp_path: Path, options):
    with pytest.raises(ExportError, match="calibrat"):
        export_model(fake_checkpoint, tmp_path / "model.onnx", **options)


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, MAX_OPSET + 1])
def test_unsupported_opset(fake_checkpoint: Path, tmp_path: Path, opset: int):
    with pytest.raises(ExportError, match="opset"):
        export_model(fake_checkpoint, tmp_path / "model.onnx", opset=opset)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ship": "bfloat16"}, "unknown precision"),
        ({"threshold": 1.0}, "threshold"),
        ({"version": " "}, "version"),
        ({"calibration_roots": (Path("/no/such/folder"),)}, "calibration data folder"),
    ],
)
def test_bad_arguments(fake_checkpoint: Path, tmp_path: Path, options, message):
    with pytest.raises(ExportError, match=message):
        export_model(fake_checkpoint, tmp_path / "model.onnx", **options)
    with pytest.raises(ExportError, match=r"\.onnx"):
        export_model(fake_checkpoint, tmp_path / "model.pb")


def test_export_error_is_a_value_error():
    assert issubclass(ExportError, ValueError)


def test_cli_reports_export_errors_in_one_line(fake_checkpoint: Path, tmp_path: Path, capsys):
    from training.cli import main

    code = main(
        ["export", "--checkpoint", str(fake_checkpoint), "--out", str(tmp_path / "m.onnx"), "--ship", "int8"]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("dermaseg export: error:") and "calibration" in error
    assert "Traceback" not in error


# --- the ONNX helpers, on tiny graphs (fast) ----------------------------------------------------------------


def tiny_matmul_model(path: Path, input_name: str = "x", output_name: str = "y") -> np.ndarray:
    """``y = x @ W`` with a 64 × 64 weight, an input of (N, 2, 2, 64) and a small bias-like tensor."""
    weights = np.random.default_rng(0).normal(0, 1, (64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [input_name, "W"], ["t"]),
            helper.make_node("Add", ["t", "b"], [output_name]),
        ],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 2, 2, 64])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", 2, 2, 64])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(np.ones(64, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return weights


def test_float16_storage_halves_the_weights_and_computes_in_float32(tmp_path: Path):
    import onnxruntime as ort

    weights = tiny_matmul_model(tmp_path / "tiny.onnx")
    converted = write_float16_storage(tmp_path / "tiny.onnx", tmp_path / "tiny16.onnx")
    assert converted == 1  # W; the 64-element bias stays float32

    proto = onnx.load(str(tmp_path / "tiny16.onnx"))
    kinds = {init.name: init.data_type for init in proto.graph.initializer}
    assert kinds == {"W_fp16": TensorProto.FLOAT16, "b": TensorProto.FLOAT}
    assert proto.graph.node[0].op_type == "Cast" and proto.graph.node[0].output[0] == "W"

    x = np.random.default_rng(1).normal(0, 1, (3, 2, 2, 64)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "tiny16.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x})
    assert got.dtype == np.float32
    expected = x @ weights.astype(np.float16).astype(np.float32) + 1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_contract_names_are_applied_to_any_graph(tmp_path: Path):
    import onnxruntime as ort

    tiny_matmul_model(tmp_path / "tiny.onnx", input_name="input_1", output_name="Identity:0")
    proto = onnx.load(str(tmp_path / "tiny.onnx"))
    apply_contract_names(proto)
    onnx.checker.check_model(proto)
    assert [value.name for value in proto.graph.input] == ["image"]
    assert [value.name for value in proto.graph.output] == ["probability"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    session = ort.InferenceSession(str(tmp_path / "renamed.onnx"), providers=["CPUExecutionProvider"])
    (output,) = session.run(["probability"], {"image": np.zeros((2, 2, 2, 64), np.float32)})
    assert output.shape == (2, 2, 2, 64)


def test_triton_config_for_another_size():
    config = triton_config((224, 320))
    assert "dims: [ 224, 320, 3 ]" in config and "dims: [ 224, 320, 1 ]" in config


def test_mixed_precision_models_are_rebuilt_in_float32():
    import keras
    from keras import layers

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        image = keras.Input((8, 8, 3), name="image")
        x = layers.Conv2D(4, 3, padding="same")(image)
        x = layers.BatchNormalization()(x)
        output = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="probability")(x)
        mixed = keras.Model(image, output)
    finally:
        keras.config.set_dtype_policy(previous)
    assert mixed.layers[1].dtype_policy.name == "mixed_bfloat16"

    rebuilt = as_float32(mixed)

    assert all(layer.dtype_policy.name == "float32" for layer in rebuilt.layers)
    batch = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(mixed(batch))
    got = keras.ops.convert_to_numpy(rebuilt(batch))
    assert np.max(np.abs(got - expected)) < 0.02  # bfloat16 rounding in the original
    assert as_float32(rebuilt) is rebuilt


def test_the_card_carries_each_datasets_terms_and_their_restriction() -> None:
    from training.export.card import data_terms, intended_use

    assert intended_use(["isic2017_train"]) == "research use, not for diagnosis"
    assert intended_use(["isic2017_train", "ph2", "ham10000"]) == (
        "research use, not for diagnosis; non-commercial only (trained on ham10000, ph2)"
    )
    terms = data_terms(["ham10000", "ph2", "isic2017_train"])
    assert (
        "CC BY-NC 4.0" in terms["ham10000"]
        and "research" in terms["ph2"]
        and "CC-0" in terms["isic2017_train"]
    )

"""`dermaseg recover`: the shipped ONNX file's weights back in a trainable Keras network, for --init-from."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from service.imaging import decode_image
from service.inference import OnnxModel
from tests.conftest import make_dataset
from training.cli import main
from training.recover import RecoverError, recover_checkpoint

pytestmark = pytest.mark.slow  # builds the release network and runs it on a few photos (about a minute)

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "dermaseg.onnx"
CARD = REPO / "models" / "dermaseg.json"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = make_dataset(tmp_path_factory.mktemp("photos"), "normalized", n=10, size=96)
    return sorted((root / "images").iterdir())


def test_the_recovered_network_computes_what_the_onnx_file_computes(
    photos: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "recovered.keras"
    report = recover_checkpoint(MODEL, CARD, out, photos[:6])

    assert report["max_difference"] < 0.02 and report["version"] == json.loads(CARD.read_text())["version"]
    recovered = keras.models.load_model(out, compile=False)
    pipeline = OnnxModel(MODEL).pipeline()
    unseen = pipeline.preprocess([decode_image(path) for path in photos[6:]])  # not measured on
    expected = pipeline.infer(unseen)
    found = keras.ops.convert_to_numpy(recovered.predict(unseen, verbose=0))[..., 0]
    np.testing.assert_allclose(found, expected, atol=0.02)
    norms = [layer for layer in recovered.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) > 40
    variances = [keras.ops.convert_to_numpy(layer.moving_variance) for layer in norms]
    assert all(np.all(v >= 0) for v in variances) and any(np.any(v != 1.0) for v in variances), (
        "the running statistics are measured, not left at the identity"
    )


def test_a_card_of_another_network_is_refused_and_nothing_is_written(
    photos: list[Path], tmp_path: Path
) -> None:
    card = json.loads(CARD.read_text())
    card["training"]["config"]["decoder_filters"] = [128, 64, 32, 16, 8]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(card))
    out = tmp_path / "recovered.keras"

    with pytest.raises(RecoverError, match=r"decoder_stage1_upsample.*card's architecture and widths"):
        recover_checkpoint(MODEL, other, out, photos[:2])
    assert not out.exists()


def test_the_command_reports_a_refusal_in_one_line(photos: list[Path], tmp_path: Path, capsys) -> None:
    code = main(["recover", "--model", str(MODEL), "--card", str(CARD), "--data", str(tmp_path),
                 "--out", str(tmp_path / "x.keras")])  # fmt: skip
    assert code == 2 and "dermaseg recover: error:" in capsys.readouterr().err
    assert not (tmp_path / "x.keras").exists()

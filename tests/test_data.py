"""Dataset discovery in every layout and pair checking (the split: tests/test_split.py)."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import DIAGNOSES, PH2_DIAGNOSES, make_dataset
from training.data import (
    DataError,
    Sample,
    discover,
    load_samples,
    parse_ph2_metadata,
    validate_pair,
)

# --- discover: normalized layout ----------------------------------------------------------------------------


def test_discover_normalized_reads_manifest(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "mydata", "normalized", n=4, size=32)

    samples = discover(root)

    assert [sample.id for sample in samples] == ["SYN_0000", "SYN_0001", "SYN_0002", "SYN_0003"]
    assert [sample.diagnosis for sample in samples] == [*DIAGNOSES, DIAGNOSES[0]]
    assert {sample.dataset for sample in samples} == {"mydata"}
    assert samples[1].image_path == root / "images" / "SYN_0001.jpg"
    assert samples[1].mask_path == root / "masks" / "SYN_0001.png"


def test_discover_normalized_finds_other_image_extensions_and_reports_missing_files(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", "normalized", n=3, size=32)
    Image.open(root / "images" / "SYN_0000.jpg").save(root / "images" / "SYN_0000.png")
    (root / "images" / "SYN_0000.jpg").unlink()
    (root / "masks" / "SYN_0002.png").unlink()

    samples = {sample.id: sample for sample in discover(root)}

    assert samples["SYN_0000"].image_path == root / "images" / "SYN_0000.png"
    # A missing mask keeps the path where it was expected, for load_samples to report by name.
    assert samples["SYN_0002"].mask_path == root / "masks" / "SYN_0002.png"


def test_discover_manifest_with_file_column(tmp_path: Path) -> None:
    """The ``samples/`` manifest: ``id,file,source,width,height,diagnosis``, images in any format."""
    root = make_dataset(tmp_path / "samples", "normalized", n=2, size=32)
    image = Image.open(root / "images" / "SYN_0001.jpg")
    image.save(root / "images" / "photo.bmp")
    (root / "manifest.csv").write_text(
        "id,file,source,width,height,diagnosis\n"
        "SYN_0000,images/SYN_0000.jpg,ph2,32,32,common nevus\n"
        'SYN_0001,images/photo.bmp,"isic2017 (copy, squashed)",32,32,\n'
    )

    first, second = discover(root)

    assert (first.image_path, first.diagnosis) == (root / "images" / "SYN_0000.jpg", "common nevus")
    assert (second.image_path, second.mask_path) == (
        root / "images" / "photo.bmp",
        root / "masks" / "SYN_0001.png",
    )
    assert second.diagnosis is None


def test_discover_manifest_without_id_column_names_the_file(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", "normalized", n=1, size=32)
    (root / "manifest.csv").write_text("name,diagnosis\nSYN_0000,nevus\n")

    with pytest.raises(DataError, match=r"manifest\.csv.*'id'"):
        discover(root)


def test_discover_image_and_mask_folders_without_manifest(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", "normalized", n=3, size=32)
    (root / "manifest.csv").unlink()

    samples = discover(root)

    assert [(sample.id, sample.mask_path.name, sample.diagnosis) for sample in samples] == [
        ("SYN_0000", "SYN_0000.png", None),
        ("SYN_0001", "SYN_0001.png", None),
        ("SYN_0002", "SYN_0002.png", None),
    ]


# --- discover: PH2 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["archive folder", "images folder", "parent folder"])
def test_discover_ph2_archive_from_any_of_its_folders(tmp_path: Path, where: str) -> None:
    archive = make_dataset(tmp_path / "PH2Dataset", "ph2", n=4, size=(30, 40))
    root = {
        "archive folder": archive,
        "images folder": archive / "PH2 Dataset images",
        "parent folder": tmp_path,
    }[where]

    samples = discover(root)

    assert [sample.id for sample in samples] == ["IMD002", "IMD003", "IMD004", "IMD005"]
    assert [sample.diagnosis for sample in samples] == [*PH2_DIAGNOSES, PH2_DIAGNOSES[0]]
    assert {sample.dataset for sample in samples} == {"ph2"}
    assert samples[0].image_path.relative_to(archive).as_posix() == (
        "PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp"
    )
    assert samples[0].mask_path.name == "IMD002_lesion.bmp"


def test_discover_ph2_without_metadata_has_no_diagnosis(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "PH2Dataset", "ph2", n=2, size=32)
    (root / "PH2_dataset.txt").unlink()

    assert [sample.diagnosis for sample in discover(root)] == [None, None]


def test_parse_ph2_metadata_reads_both_known_formats(tmp_path: Path) -> None:
    owners = tmp_path / "owners.txt"
    owners.write_text(
        "||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network ||\n"
        "|| IMD003 ||                        ||                  0 ||         0 |               T ||\n"
        "|| IMD058 ||              Melanoma ||                  2 ||         0 |              AT ||\n"
        "|| IMD999 ||                        ||                    ||         0 |               T ||\n"
        "\n Legends for ...\n"
    )
    tabbed = tmp_path / "tabbed.txt"  # the layout of the copy in chelseaparlett/SkinCancerVariation
    tabbed.write_text(
        "Name\tClinical Diagnosis\tAsymmetry\nIMD003\t0\t0\nIMD002\t1\t1\nIMD058\t2\t0\n\t\t\n0 - Co\t\t\n"
    )

    assert parse_ph2_metadata(owners) == {"IMD003": "common nevus", "IMD058": "melanoma"}
    assert parse_ph2_metadata(tabbed) == {
        "IMD003": "common nevus",
        "IMD002": "atypical nevus",
        "IMD058": "melanoma",
    }
    assert parse_ph2_metadata(tmp_path / "absent.txt") == {}


# --- discover: ISIC -----------------------------------------------------------------------------------------


def test_discover_isic2017_sibling_folders_with_diagnoses(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "challenge", "isic2017", n=4, size=32)

    samples = discover(root)

    assert [sample.id for sample in samples] == [f"ISIC_000000{index}" for index in range(4)]
    assert [sample.diagnosis for sample in samples] == ["nevus", "melanoma", "seborrheic keratosis", "nevus"]
    assert {sample.dataset for sample in samples} == {"isic2017"}
    assert all(sample.image_path.parent.name == "ISIC-2017_Training_Data" for sample in samples)
    assert all(sample.image_path.suffix == ".jpg" for sample in samples), "superpixel files are no images"
    assert samples[0].mask_path.relative_to(root).as_posix() == (
        "ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png"
    )


def test_discover_isic2016_one_folder_capitalized_masks(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "downloads", "isic2016", n=3, size=32)

    samples = discover(root)

    assert [(sample.id, sample.mask_path.name) for sample in samples] == [
        (f"ISIC_000000{index}", f"ISIC_000000{index}_Segmentation.png") for index in range(3)
    ]
    assert {sample.dataset for sample in samples} == {"isic2016"}
    assert {sample.diagnosis for sample in samples} == {None}


def test_discover_isic2018_task3_diagnoses(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ISIC2018", "isic2016", n=2, size=32)
    (root / "ISIC2018_Task3_Training_GroundTruth.csv").write_text(
        "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
        "ISIC_0000000,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000001,0.0,0.0,1.0,0.0,0.0,0.0,0.0\n"
    )

    samples = discover(root)

    assert [sample.diagnosis for sample in samples] == ["nevus", "basal cell carcinoma"]
    assert {sample.dataset for sample in samples} == {"isic2018"}


def test_discover_isic_image_without_mask_is_reported_later(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "isic", "isic2017", n=2, size=32)
    (root / "ISIC-2017_Training_Part1_GroundTruth" / "ISIC_0000001_segmentation.png").unlink()

    with_mask, without_mask = discover(root)

    assert with_mask.mask_path.is_file()
    assert not without_mask.mask_path.exists()
    assert validate_pair(without_mask) == f"mask missing ({without_mask.mask_path})"


# --- discover: errors ---------------------------------------------------------------------------------------


def test_discover_unknown_layout_says_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "holiday.jpg").write_bytes(b"not a lesion")

    with pytest.raises(DataError, match="no dataset found") as raised:
        discover(tmp_path)

    message = str(raised.value)
    assert str(tmp_path) in message
    for expected in ("manifest.csv", "PH2 Dataset images", "ISIC_xxxxxxx_segmentation.png"):
        assert expected in message


def test_discover_parent_of_datasets_points_to_them(tmp_path: Path) -> None:
    make_dataset(tmp_path / "first", "normalized", n=1, size=32)
    make_dataset(tmp_path / "second", "normalized", n=1, size=32)

    with pytest.raises(DataError, match="its sub-folders first, second are datasets: give them"):
        discover(tmp_path)


def test_discover_isic_images_without_any_mask_is_no_dataset(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "isic", "isic2017", n=2, size=32)
    shutil.rmtree(root / "ISIC-2017_Training_Part1_GroundTruth")

    with pytest.raises(DataError, match="no dataset found"):
        discover(root)


def test_discover_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        discover(tmp_path / "absent")


# --- validate_pair and load_samples -------------------------------------------------------------------------


def _sample(tmp_path: Path, image_size: tuple[int, int], mask_size: tuple[int, int]) -> Sample:
    image_path, mask_path = tmp_path / "photo.jpg", tmp_path / "photo_mask.png"
    Image.new("RGB", image_size, (200, 150, 120)).save(image_path)
    Image.new("L", mask_size, 0).save(mask_path)
    return Sample("photo", image_path, mask_path, "test")


def test_validate_pair_reasons(tmp_path: Path) -> None:
    good = _sample(tmp_path, (40, 30), (40, 30))
    assert validate_pair(good) is None

    mismatched = _sample(tmp_path, (40, 30), (30, 40))
    assert validate_pair(mismatched) == (
        f"mask {mismatched.mask_path} is 30x40 but image {mismatched.image_path} is 40x30"
    )

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 this is no jpeg")
    assert (
        validate_pair(Sample("g", garbage, good.mask_path, "test"))
        == f"image {garbage} is not a readable image"
    )

    truncated = tmp_path / "truncated.png"
    Image.new("L", (40, 30), 255).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    assert "unreadable" in validate_pair(Sample("t", good.image_path, truncated, "test"))

    gif = tmp_path / "photo.gif"
    Image.new("RGB", (40, 30)).save(gif)
    assert "is GIF" in validate_pair(Sample("gif", gif, good.mask_path, "test"))

    assert validate_pair(Sample("m", tmp_path / "none.jpg", good.mask_path, "test")) == (
        f"image missing ({tmp_path / 'none.jpg'})"
    )


def test_validate_pair_applies_exif_rotation(tmp_path: Path) -> None:
    """A phone photo stored 40x30 with "rotate 90°" is 30x40 once decoded, like its mask."""
    image_path, mask_path = tmp_path / "phone.jpg", tmp_path / "phone.png"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 30)).save(image_path, exif=exif)
    Image.new("L", (30, 40)).save(mask_path)

    assert validate_pair(Sample("phone", image_path, mask_path, "test")) is None


def test_load_samples_drops_and_names_bad_pairs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_dataset(tmp_path / "data", "normalized", n=5, size=32)
    (root / "masks" / "SYN_0001.png").unlink()
    (root / "images" / "SYN_0002.jpg").write_bytes(b"garbage")
    Image.new("L", (20, 32)).save(root / "masks" / "SYN_0003.png")

    with caplog.at_level(logging.WARNING, logger="training.data"):
        samples = load_samples([root])

    assert [sample.id for sample in samples] == ["SYN_0000", "SYN_0004"]
    warning = caplog.text
    assert "3 of 5 image/mask pairs are unusable" in warning
    assert f"data/SYN_0001: mask missing ({root / 'masks' / 'SYN_0001.png'})" in warning
    assert f"data/SYN_0002: image {root / 'images' / 'SYN_0002.jpg'} is not a readable image" in warning
    assert "data/SYN_0003: mask" in warning and "is 20x32 but image" in warning


def test_load_samples_without_validation_keeps_everything(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", "normalized", n=3, size=32)
    (root / "masks" / "SYN_0001.png").unlink()

    assert len(load_samples([root], validate=False)) == 3


def test_load_samples_nothing_usable(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", "normalized", n=2, size=32)
    shutil.rmtree(root / "masks")

    with pytest.raises(DataError, match="no usable image/mask pairs"):
        load_samples([root])
    with pytest.raises(DataError, match="no dataset folder"):
        load_samples([])


def test_load_samples_combines_layouts_sorted_and_keeps_repeated_folders_once(tmp_path: Path) -> None:
    normalized = make_dataset(tmp_path / "zeta", "normalized", n=2, size=32)
    isic = make_dataset(tmp_path / "isic", "isic2017", n=2, size=32)
    ph2 = make_dataset(tmp_path / "PH2Dataset", "ph2", n=2, size=32)

    samples = load_samples([normalized, isic, ph2, normalized])

    assert [(sample.dataset, sample.id) for sample in samples] == [
        ("isic2017", "ISIC_0000000"),
        ("isic2017", "ISIC_0000001"),
        ("ph2", "IMD002"),
        ("ph2", "IMD003"),
        ("zeta", "SYN_0000"),
        ("zeta", "SYN_0001"),
    ]


# --- the real data beside the checkout ----------------------------------------------------------------------


@pytest.mark.realdata
def test_discover_real_data(shared_data: Path) -> None:
    ph2 = discover(shared_data / "ph2")
    samples = discover(shared_data / "samples")

    assert len(ph2) == 200
    assert Counter(sample.diagnosis for sample in ph2) == {
        "common nevus": 80,
        "atypical nevus": 80,
        "melanoma": 40,
    }
    assert all(sample.image_path.is_file() and sample.mask_path.is_file() for sample in ph2)
    assert len(samples) == 9
    assert {sample.image_path.suffix for sample in samples} == {".bmp", ".jpg"}
    assert all(validate_pair(sample) is None for sample in samples)

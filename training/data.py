"""Finding image/mask pairs on disk and checking them; :mod:`training.split` splits them.

Three layouts are read, each detected from what the folder holds:

* **normalized** — ``images/<id>.<ext>``, ``masks/<id>.png`` and ``manifest.csv`` (columns
  ``id,split,orig_width,orig_height,diagnosis``, or ``id,file,...,diagnosis`` where ``file`` is the image's
  path relative to the folder; an optional ``group`` or ``lesion_id`` column names photos of one lesion,
  which a split keeps together). Without a manifest, ``images/`` and ``masks/`` are paired by file name.
* **PH2** as its owners publish it — ``PH2 Dataset images/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp`` and
  ``IMDxxx_lesion/IMDxxx_lesion.bmp``, the diagnosis from ``PH2_dataset.txt`` when it is there.
* **ISIC 2016/2017/2018** challenge folders — ``ISIC_xxxxxxx.jpg`` and ``ISIC_xxxxxxx_segmentation.png``
  (either capitalization), anywhere below the folder, paired by id; the diagnosis from a ``*GroundTruth.csv``
  when there is one.

Sample ids are kept as the datasets spell them, so the same id can occur in two datasets (the ISIC 2017
training set contains ISIC 2016's images); a sample is identified by ``(dataset, id)``.

No Keras here: the evaluation of an ONNX model reads its data through this module too.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from service.imaging import SUPPORTED_FORMATS

logger = logging.getLogger(__name__)

#: Image file extensions looked for, in order of preference.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: Mask file extensions looked for, in order of preference.
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif")

PH2_IMAGES_FOLDER = "PH2 Dataset images"
PH2_ARCHIVE_FOLDER = "PH2Dataset"
PH2_METADATA_FILE = "PH2_dataset.txt"
#: PH2's "Clinical Diagnosis" codes.
PH2_DIAGNOSES = {"0": "common nevus", "1": "atypical nevus", "2": "melanoma"}

#: ISIC 2018 Task 3 (HAM10000) one-hot columns.
ISIC_CLASS_COLUMNS = {
    "MEL": "melanoma",
    "NV": "nevus",
    "BCC": "basal cell carcinoma",
    "AKIEC": "actinic keratosis",
    "BKL": "benign keratosis",
    "DF": "dermatofibroma",
    "VASC": "vascular lesion",
}

#: Manifest columns naming the group a photo belongs to (HAM10000: ``lesion_id``), the first one present.
GROUP_COLUMNS = ("group", "lesion_id")

_PH2_ID = re.compile(r"^IMD\d+$")
_ISIC_FILE = re.compile(r"^(ISIC_\d+)(?:_(segmentation|superpixels))?(\.[A-Za-z]+)$", re.IGNORECASE)
_YEAR = re.compile(r"20(1[6-9]|2\d)")
_MASK_SUFFIXES = ("", "_segmentation", "_Segmentation", "_mask", "_lesion")
# EXIF orientations that swap width and height when applied (decode_image applies them).
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


class DataError(ValueError):
    """A dataset folder or file cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One photo and its ground-truth lesion mask.

    Attributes:
        id: the image's id as its dataset spells it (``IMD002``, ``ISIC_0000000``); unique per dataset only.
        image_path: the photo.
        mask_path: the binary lesion mask, the same size as the photo.
        dataset: the dataset's name (the folder's name for the normalized layout, ``ph2``, ``isic2017`` …).
        diagnosis: the clinical class where the dataset gives one (``melanoma``, ``common nevus`` …).
        group: the lesion (or other group) the photo belongs to where the manifest says so, unique per
            dataset; :func:`training.split.split_samples` never puts one group on both sides.
    """

    id: str
    image_path: Path
    mask_path: Path
    dataset: str
    diagnosis: str | None = None
    group: str | None = None


def sample_sort_key(sample: Sample) -> tuple[str, str, str]:
    """The deterministic order of samples: by dataset, then id, then image path."""
    return (sample.dataset, sample.id, str(sample.image_path))


# ------------------------------------------------------------------------------------------------------------
# Discovery


def discover(root: Path) -> list[Sample]:
    """Finds every image/mask pair in ``root``, whichever supported layout it has.

    Pairs are returned as found, unchecked: an image without its mask (or a mask without its image) is
    returned with the path where the missing file was expected, so that :func:`load_samples` can report it.

    Args:
        root: a dataset folder in the normalized, PH2 or ISIC layout (see the module docstring).

    Returns:
        The samples, sorted by dataset, id and image path.

    Raises:
        DataError: ``root`` is no folder, or holds none of the layouts, or its manifest is unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if (root / "manifest.csv").is_file():
        samples = _discover_manifest(root)
    elif (ph2_images := _find_ph2_images(root)) is not None:
        samples = _discover_ph2(ph2_images, root)
    elif (paired := _discover_image_mask_folders(root)) is not None:
        samples = paired
    elif (isic := _discover_isic(root)) is not None:
        samples = isic
    else:
        datasets_below = sorted(path.parent.name for path in root.glob("*/manifest.csv"))
        hint = (
            f"; its sub-folders {', '.join(datasets_below)} are datasets: give them" if datasets_below else ""
        )
        raise DataError(
            f"{root}: no dataset found. Looked for manifest.csv with images/ and masks/ (normalized layout), "
            f"'{PH2_IMAGES_FOLDER}/IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp' with IMDxxx_lesion/ (PH2), "
            "images/ and masks/ with matching file names, and ISIC_xxxxxxx.jpg with "
            f"ISIC_xxxxxxx_segmentation.png anywhere below it (ISIC 2016-2018){hint}"
        )
    return sorted(samples, key=sample_sort_key)


def _dataset_name(root: Path) -> str:
    return root.resolve().name or "dataset"


def _first_existing(folder: Path, stem: str, extensions: Iterable[str]) -> Path | None:
    for extension in extensions:
        for candidate in (folder / f"{stem}{extension}", folder / f"{stem}{extension.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _read_manifest(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = [name.strip() for name in reader.fieldnames or []]
            if "id" not in columns:
                raise DataError(f"{path}: no 'id' column (columns: {', '.join(columns) or 'none'})")
            return [
                {
                    (key or "").strip(): (value or "").strip()
                    for key, value in row.items()
                    if isinstance(value, str)
                }
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read the manifest ({error})") from None


def _discover_manifest(root: Path) -> list[Sample]:
    manifest = root / "manifest.csv"
    dataset = _dataset_name(root)
    samples: list[Sample] = []
    seen: set[str] = set()
    for line_number, row in enumerate(_read_manifest(manifest), start=2):
        sample_id = row.get("id", "")
        if not sample_id:
            logger.warning("%s: line %d has no id; skipped", manifest, line_number)
            continue
        if sample_id in seen:
            logger.warning(
                "%s: id %s listed twice; the second (line %d) is ignored", manifest, sample_id, line_number
            )
            continue
        seen.add(sample_id)
        if row.get("file"):
            image_path = root / row["file"]
        else:
            image_path = _first_existing(root / "images", sample_id, IMAGE_EXTENSIONS) or (
                root / "images" / f"{sample_id}.jpg"
            )
        if row.get("mask"):
            mask_path = root / row["mask"]
        else:
            mask_path = _first_existing(root / "masks", sample_id, MASK_EXTENSIONS) or (
                root / "masks" / f"{sample_id}.png"
            )
        group = next((row[column] for column in GROUP_COLUMNS if row.get(column)), None)
        samples.append(Sample(sample_id, image_path, mask_path, dataset, row.get("diagnosis") or None, group))
    return samples


def _discover_image_mask_folders(root: Path) -> list[Sample] | None:
    """``images/`` and ``masks/`` without a manifest, paired by file name; None unless at least one pair."""
    images_folder, masks_folder = root / "images", root / "masks"
    if not (images_folder.is_dir() and masks_folder.is_dir()):
        return None
    dataset = _dataset_name(root)
    samples = []
    for image_path in sorted(images_folder.iterdir()):
        if image_path.suffix.lower() not in IMAGE_EXTENSIONS or image_path.name.startswith("."):
            continue
        stems = [image_path.stem + suffix for suffix in _MASK_SUFFIXES]
        mask_path = next(
            (found for stem in stems if (found := _first_existing(masks_folder, stem, MASK_EXTENSIONS))), None
        )
        samples.append((image_path, mask_path))
    if not any(mask_path for _, mask_path in samples):
        return None
    return [
        Sample(image_path.stem, image_path, mask_path or masks_folder / f"{image_path.stem}.png", dataset)
        for image_path, mask_path in samples
    ]


def _is_ph2_images_folder(folder: Path) -> bool:
    if not folder.is_dir():
        return False
    for case in folder.iterdir():
        if _PH2_ID.match(case.name) and (case / f"{case.name}_Dermoscopic_Image").is_dir():
            return True
    return False


def _find_ph2_images(root: Path) -> Path | None:
    """The folder holding the ``IMDxxx`` case folders: root itself, or below it as the archive has it."""
    candidates = (root, root / PH2_IMAGES_FOLDER, root / PH2_ARCHIVE_FOLDER / PH2_IMAGES_FOLDER)
    return next((folder for folder in candidates if _is_ph2_images_folder(folder)), None)


def _discover_ph2(images_folder: Path, root: Path) -> list[Sample]:
    metadata_candidates = (
        images_folder.parent / PH2_METADATA_FILE,
        images_folder / PH2_METADATA_FILE,
        root / PH2_METADATA_FILE,
    )
    metadata = next((path for path in metadata_candidates if path.is_file()), None)
    diagnoses = parse_ph2_metadata(metadata) if metadata else {}
    samples = []
    for case in sorted(images_folder.iterdir()):
        if not (case.is_dir() and _PH2_ID.match(case.name)):
            continue
        sample_id = case.name
        image_folder = case / f"{sample_id}_Dermoscopic_Image"
        lesion_folder = case / f"{sample_id}_lesion"
        image_path = (
            _first_existing(image_folder, sample_id, IMAGE_EXTENSIONS) or image_folder / f"{sample_id}.bmp"
        )
        mask_path = _first_existing(lesion_folder, f"{sample_id}_lesion", MASK_EXTENSIONS) or (
            lesion_folder / f"{sample_id}_lesion.bmp"
        )
        samples.append(Sample(sample_id, image_path, mask_path, "ph2", diagnoses.get(sample_id)))
    return samples


def parse_ph2_metadata(path: Path) -> dict[str, str]:
    """Reads the clinical diagnosis of each case from PH2's ``PH2_dataset.txt``, leniently.

    The owners' file is a ``||``-separated table (``|| IMD003 ||  || 0 || ...``); copies in circulation are
    tab-separated (``IMD003<TAB>0<TAB>0``). The "Clinical Diagnosis" column is found from the header where
    there is one. Codes 0/1/2 become ``common nevus`` / ``atypical nevus`` / ``melanoma``; unparsable lines
    are skipped.

    Args:
        path: the ``PH2_dataset.txt`` file.

    Returns:
        ``{case id: diagnosis}``; empty when the file cannot be read.
    """
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        logger.warning("%s: cannot read (%s); PH2 diagnoses left out", path, error)
        return {}
    diagnoses: dict[str, str] = {}
    column: int | None = None
    for line in lines:
        cells = [cell.strip() for cell in (line.split("||") if "||" in line else line.split("\t"))]
        lowered = [cell.lower() for cell in cells]
        if column is None and "clinical diagnosis" in lowered:
            column = lowered.index("clinical diagnosis")
            continue
        id_column = next((index for index, cell in enumerate(cells) if _PH2_ID.match(cell)), None)
        if id_column is None:
            continue
        # Without a header, the code follows the id (tab files) or the histology column ('||' files).
        value_column = column if column is not None else id_column + (2 if "||" in line else 1)
        if value_column >= len(cells):
            continue
        value = cells[value_column]
        code = value.split()[0] if value else ""
        if code in PH2_DIAGNOSES:
            diagnoses[cells[id_column]] = PH2_DIAGNOSES[code]
        elif value and not value.isdigit():
            diagnoses[cells[id_column]] = value.lower()
    return diagnoses


def _discover_isic(root: Path) -> list[Sample] | None:
    """ISIC challenge files anywhere below ``root``, paired by id; None when there are none."""
    images: dict[str, list[Path]] = defaultdict(list)
    masks: dict[str, list[Path]] = defaultdict(list)
    for folder, folder_names, file_names in os.walk(root):
        folder_names[:] = sorted(name for name in folder_names if not name.startswith((".", "__MACOSX")))
        for file_name in sorted(file_names):
            match = _ISIC_FILE.match(file_name)
            if not match:
                continue
            sample_id, kind, extension = (
                match.group(1),
                (match.group(2) or "").lower(),
                match.group(3).lower(),
            )
            if kind == "segmentation" and extension in MASK_EXTENSIONS:
                masks[sample_id].append(Path(folder) / file_name)
            elif not kind and extension in IMAGE_EXTENSIONS:
                images[sample_id].append(Path(folder) / file_name)
    if not masks:  # images alone (a test set without ground truth, or another layout's files) are no dataset
        return None
    for kind, found in (("images", images), ("masks", masks)):
        for sample_id, paths in found.items():
            if len(paths) > 1:
                logger.warning("%s: %d %s for %s; using %s", root, len(paths), kind, sample_id, paths[0])
    dataset = _isic_dataset_name(root, [paths[0] for paths in (*masks.values(), *images.values())])
    diagnoses = _read_isic_diagnoses(root)
    samples = []
    for sample_id in sorted(images.keys() | masks.keys()):
        if sample_id in images:
            image_path = images[sample_id][0]
        else:
            image_path = masks[sample_id][0].with_name(f"{sample_id}.jpg")
        if sample_id in masks:
            mask_path = masks[sample_id][0]
        else:
            mask_path = image_path.with_name(f"{sample_id}_segmentation.png")
        samples.append(Sample(sample_id, image_path, mask_path, dataset, diagnoses.get(sample_id)))
    return samples


def _isic_dataset_name(root: Path, paths: Sequence[Path]) -> str:
    """``isic2017`` etc. from the root's name or, failing that, the sub-folders' names; else ``isic``."""
    if match := _YEAR.search(_dataset_name(root)):
        return f"isic{match.group(0)}"
    years = Counter(
        match.group(0)
        for path in paths
        for part in path.relative_to(root).parts[:-1]
        if (match := _YEAR.search(part))
    )
    return f"isic{years.most_common(1)[0][0]}" if years else "isic"


def _read_isic_diagnoses(root: Path) -> dict[str, str]:
    """Diagnoses from ISIC ground-truth CSVs below ``root`` (2016, 2017 Part 3, 2018 Task 3), leniently."""
    diagnoses: dict[str, str] = {}
    for path in sorted(root.rglob("*.csv")):
        if "groundtruth" not in path.name.lower():
            continue
        try:
            with path.open(newline="", encoding="utf-8-sig") as stream:
                rows = [row for row in csv.reader(stream) if row]
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            logger.warning("%s: cannot read (%s); its diagnoses are left out", path, error)
            continue
        if rows:
            diagnoses.update(_parse_isic_ground_truth(rows))
    return diagnoses


def _parse_isic_ground_truth(rows: list[list[str]]) -> dict[str, str]:
    header = [cell.strip() for cell in rows[0]]
    has_header = not re.match(r"^ISIC_\d+$", header[0])
    body = rows[1:] if has_header else rows
    columns = {name.lower(): index for index, name in enumerate(header)} if has_header else {}
    diagnoses = {}
    for row in body:
        cells = [cell.strip() for cell in row]
        if not cells or not re.match(r"^ISIC_\d+$", cells[0]):
            continue
        try:
            if "melanoma" in columns and "seborrheic_keratosis" in columns:  # 2017 Part 3
                if _is_positive(cells[columns["melanoma"]]):
                    diagnoses[cells[0]] = "melanoma"
                elif _is_positive(cells[columns["seborrheic_keratosis"]]):
                    diagnoses[cells[0]] = "seborrheic keratosis"
                else:
                    diagnoses[cells[0]] = "nevus"
            elif (
                has_header and {name.lower() for name in ISIC_CLASS_COLUMNS} <= columns.keys()
            ):  # 2018 Task 3
                diagnoses[cells[0]] = next(
                    name
                    for code, name in ISIC_CLASS_COLUMNS.items()
                    if _is_positive(cells[columns[code.lower()]])
                )
            elif not has_header and len(cells) >= 2:  # 2016 Part 3: id, benign/malignant (or 0/1)
                label = cells[1].lower()
                diagnoses[cells[0]] = {
                    "0": "benign",
                    "0.0": "benign",
                    "1": "malignant",
                    "1.0": "malignant",
                }.get(label, label)
        except (IndexError, StopIteration):
            continue
    return diagnoses


def _is_positive(value: str) -> bool:
    try:
        return float(value) >= 0.5
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------------------
# Checking and combining


def _image_size(path: Path, role: str) -> tuple[tuple[int, int] | None, str | None]:
    """``((width, height) as decoded, None)`` or ``(None, reason)``; reads the header, verifies the file."""
    if not path.is_file():
        return None, f"{role} missing ({path})"
    try:
        with Image.open(path) as image:
            if role == "image" and image.format not in SUPPORTED_FORMATS:
                return None, f"{role} {path} is {image.format}, not JPEG, PNG, BMP or TIFF"
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION_TAG) if role == "image" else None
            image.verify()
    except UnidentifiedImageError:
        return None, f"{role} {path} is not a readable image"
    except (OSError, SyntaxError, ValueError) as error:
        return None, f"{role} {path} is unreadable ({error})"
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return (width, height), None


def validate_pair(sample: Sample) -> str | None:
    """Checks that a pair can be trained on, reading file headers only.

    Args:
        sample: the pair to check.

    Returns:
        None when both files exist, are readable images, and have the same size (the image's EXIF rotation
        applied, as :func:`service.imaging.decode_image` applies it); otherwise the reason, naming the file.
    """
    image_size, reason = _image_size(sample.image_path, "image")
    if reason:
        return reason
    mask_size, reason = _image_size(sample.mask_path, "mask")
    if reason:
        return reason
    if image_size != mask_size:
        assert image_size is not None and mask_size is not None
        return (
            f"mask {sample.mask_path} is {mask_size[0]}x{mask_size[1]} but image {sample.image_path} is "
            f"{image_size[0]}x{image_size[1]}"
        )
    return None


def load_samples(roots: Sequence[Path], validate: bool = True) -> list[Sample]:
    """Discovers the pairs in every folder, drops the unusable ones with a warning, and sorts the rest.

    Args:
        roots: dataset folders, each in any supported layout.
        validate: check each pair with :func:`validate_pair` (header reads only) and drop failures.

    Returns:
        The usable samples of all folders, sorted by dataset, id and image path. The same file found twice
        (a folder given twice) is kept once.

    Raises:
        DataError: a folder holds no supported layout, or no usable pair remains.
    """
    if not roots:
        raise DataError("no dataset folder given")
    found: dict[Path, Sample] = {}
    for root in roots:
        for sample in discover(Path(root)):
            key = sample.image_path.resolve()
            if key in found:
                logger.warning(
                    "%s is found twice (datasets %s and %s); kept once",
                    sample.image_path,
                    found[key].dataset,
                    sample.dataset,
                )
                continue
            found[key] = sample
    samples = sorted(found.values(), key=sample_sort_key)
    if validate:
        problems = [(sample, reason) for sample in samples if (reason := validate_pair(sample))]
        if problems:
            logger.warning(
                "%d of %d image/mask pairs are unusable and left out:\n%s",
                len(problems),
                len(samples),
                "\n".join(f"  {sample.dataset}/{sample.id}: {reason}" for sample, reason in problems),
            )
            dropped = {id(sample) for sample, _ in problems}
            samples = [sample for sample in samples if id(sample) not in dropped]
    if not samples:
        raise DataError(f"no usable image/mask pairs in {', '.join(str(root) for root in roots)}")
    duplicates = [key for key, count in Counter(sample.id for sample in samples).items() if count > 1]
    if duplicates:
        logger.info(
            "%d ids occur in more than one dataset (e.g. %s); samples are told apart by dataset",
            len(duplicates),
            duplicates[0],
        )
    return samples

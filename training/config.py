"""Training configuration: one dataclass whose defaults are the paper's Table 1."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ARCHITECTURES = ("resnet50v2-unet", "unet")
LOSSES = ("focal", "bce", "focal+jaccard", "focal+dice")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("plateau", "cosine")
#: AdamW's decoupled weight decay when none is given (PyTorch's default; Loshchilov & Hutter's range).
DEFAULT_WEIGHT_DECAY = 0.01
#: The region term's weight when a ``focal+…`` loss is chosen without ``region_weight``.
DEFAULT_REGION_WEIGHT = 1.0


class ConfigError(ValueError):
    """A training option has a value that cannot work."""


@dataclass
class TrainConfig:
    """Everything a training run needs; written to ``RUN_DIR/config.json``."""

    data: list[str] = field(default_factory=list, metadata={"help": "dataset folders (any supported layout)"})
    out: str = field(default="runs/default", metadata={"help": "run directory"})
    arch: str = field(default="resnet50v2-unet", metadata={"help": "network: " + ", ".join(ARCHITECTURES)})
    encoder_weights: str = field(
        default="imagenet", metadata={"help": "imagenet (downloaded), none, or a path to a weights file"}
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "warm start: the weights (not the optimizer state) of a .keras checkpoint"},
    )
    split_like: str | None = field(
        default=None,
        metadata={
            "help": "a model card (models/NAME.json): the photos its run trained on stay in training and its "
            "validation photos in validation, so a warm start from that model never validates on what it "
            "saw; the rest are split as usual"
        },
    )
    decoder_filters: tuple[int, ...] = field(
        default=(512, 256, 128, 64, 32), metadata={"help": "decoder widths, deepest stage first"}
    )
    unet_base_filters: int = field(default=64, metadata={"help": "plain U-Net: filters of the first level"})
    dropout_rate: float = field(default=0.3, metadata={"help": "dropout in the decoder"})
    loss: str = field(
        default="focal",
        metadata={
            "help": "focal (the paper's eq. 2), bce, or focal plus a per-image soft Jaccard or Dice term "
            "(focal+jaccard, focal+dice)"
        },
    )
    focal_alpha: float = field(default=0.8, metadata={"help": "focal loss alpha"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal loss gamma"})
    region_weight: float | None = field(
        default=None,
        metadata={"help": f"weight of the region term of a focal+… loss (default {DEFAULT_REGION_WEIGHT})"},
    )
    augment: bool = field(default=True, metadata={"help": "on-the-fly geometric augmentation"})
    rotation_degrees: float = field(
        default=30.0,
        metadata={"help": "rotation drawn from ±this many degrees (180: any angle; dermoscopy has no up)"},
    )
    zoom: float = field(default=0.2, metadata={"help": "scale drawn from [1 − zoom, 1 + zoom]"})
    photometric: bool = field(
        default=False,
        metadata={"help": "also jitter brightness, contrast, gamma, hue and saturation (image only)"},
    )
    color_constancy: bool = field(
        default=False,
        metadata={
            "help": "correct each photo's colour cast inside the network (Shades of Gray, p = 6), in "
            "training and wherever the model runs"
        },
    )
    source_weights: str = field(
        default="none",
        metadata={
            "help": "per-source sampling of the training images: none (every image once per pass), balanced "
            "(each source equally often), or NAME=W,NAME=W (each source's share of every epoch)"
        },
    )
    image_size: int = field(default=224, metadata={"help": "square network input, pixels"})
    batch_size: int = field(default=16, metadata={"help": "images per step"})
    epochs: int = field(default=50, metadata={"help": "maximum epochs"})
    learning_rate: float = field(default=1e-4, metadata={"help": "(peak) learning rate"})
    optimizer: str = field(default="adam", metadata={"help": "adam or adamw (decoupled weight decay)"})
    weight_decay: float | None = field(
        default=None,
        metadata={"help": f"AdamW weight decay, every weight (default {DEFAULT_WEIGHT_DECAY}; adam: none)"},
    )
    schedule: str = field(
        default="plateau",
        metadata={"help": "plateau (ReduceLROnPlateau on val_loss) or cosine (decay over all the steps)"},
    )
    warmup_epochs: int = field(
        default=0, metadata={"help": "cosine: epochs of linear warm-up from 0 to the learning rate"}
    )
    ema: bool = field(
        default=False,
        metadata={"help": "validate and checkpoint an exponential moving average of the weights"},
    )
    ema_momentum: float = field(default=0.99, metadata={"help": "EMA momentum (per step)"})
    lr_factor: float = field(default=0.2, metadata={"help": "ReduceLROnPlateau factor"})
    lr_patience: int = field(default=5, metadata={"help": "ReduceLROnPlateau patience (epochs)"})
    min_lr: float = field(default=1e-6, metadata={"help": "learning-rate floor (plateau and cosine)"})
    early_stopping_patience: int = field(default=10, metadata={"help": "EarlyStopping patience (epochs)"})
    val_fraction: float = field(default=0.2, metadata={"help": "share of images held out for validation"})
    seed: int = field(default=42, metadata={"help": "seed for the split, the augmentation and the weights"})
    precision: str = field(default="float32", metadata={"help": "float32, mixed_bfloat16 or mixed_float16"})
    workers: int = field(default=2, metadata={"help": "data-loading workers (threads)"})
    steps_per_epoch: int | None = field(
        default=None, metadata={"help": "batches per epoch, repeating the data as needed (default: one pass)"}
    )
    max_images: int | None = field(
        default=None,
        metadata={"help": "use only N images (tests): one source's first N, or a seeded sample of several"},
    )

    def __post_init__(self) -> None:
        self.decoder_filters = tuple(int(f) for f in self.decoder_filters)
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"arch must be one of {ARCHITECTURES}, not {self.arch!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, not {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.image_size < 32 or self.image_size % 32:
            raise ConfigError(f"image size must be a multiple of 32 and at least 32, not {self.image_size}")
        if len(self.decoder_filters) != 5 or min(self.decoder_filters) < 1:
            raise ConfigError(f"decoder filters must be 5 positive widths, not {self.decoder_filters}")
        for name in ("batch_size", "epochs", "workers", "unet_base_filters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 1, not {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"validation fraction must be between 0 and 1, not {self.val_fraction}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"dropout rate must be in [0, 1), not {self.dropout_rate}")
        if self.learning_rate <= 0 or self.min_lr <= 0:
            raise ConfigError("learning rates must be positive")
        self._check_recipe()

    def _check_recipe(self) -> None:
        """Validates the release-recipe options and fills in the defaults that depend on other options."""
        if self.loss.startswith("focal+"):
            if self.region_weight is None:
                self.region_weight = DEFAULT_REGION_WEIGHT
            if self.region_weight < 0:
                raise ConfigError(f"region weight must be >= 0, not {self.region_weight}")
        elif self.region_weight is not None:
            raise ConfigError(f"region weight applies to focal+jaccard and focal+dice, not to {self.loss!r}")
        if not 0 <= self.rotation_degrees <= 360:
            raise ConfigError(f"rotation degrees must be between 0 and 360, not {self.rotation_degrees}")
        if not 0 <= self.zoom < 1:
            raise ConfigError(f"zoom must be in [0, 1), not {self.zoom}")
        if self.photometric and not self.augment:
            raise ConfigError("photometric augmentation needs augmentation on (drop --no-augment)")
        parse_source_weights(self.source_weights)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.optimizer == "adamw":
            if self.weight_decay is None:
                self.weight_decay = DEFAULT_WEIGHT_DECAY
            if self.weight_decay < 0:
                raise ConfigError(f"weight decay must be >= 0, not {self.weight_decay}")
        elif self.weight_decay:
            raise ConfigError("weight decay needs --optimizer adamw (adam has none)")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warm-up epochs must be >= 0, not {self.warmup_epochs}")
        if self.warmup_epochs and self.schedule != "cosine":
            raise ConfigError("warm-up epochs need --schedule cosine")
        if self.warmup_epochs >= self.epochs and self.schedule == "cosine":
            raise ConfigError(
                f"warm-up ({self.warmup_epochs} epochs) must be shorter than the run ({self.epochs} epochs)"
            )
        if not 0 < self.ema_momentum < 1:
            raise ConfigError(f"EMA momentum must be between 0 and 1, not {self.ema_momentum}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["decoder_filters"] = list(self.decoder_filters)
        return data

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TrainConfig:
        """The configuration :meth:`to_json` wrote (keys this version does not know are ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return cls.from_json(json.loads(Path(path).read_text()))


def parse_source_weights(text: str) -> dict[str, float] | None:
    """Reads ``--source-weights``: None for ``none``, ``{}`` for ``balanced`` (every source 1), else the map.

    Raises:
        ConfigError: not ``none``, ``balanced`` or ``NAME=W,...`` with weights >= 0, at least one positive.
    """
    text = text.strip()
    if text == "none":
        return None
    if text == "balanced":
        return {}
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, separator, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not separator or not name.strip() or not weight >= 0 or name.strip() in weights:
            raise ConfigError(
                f"source weights must be none, balanced or NAME=WEIGHT,NAME=WEIGHT (weights >= 0, each "
                f"source once), not {text!r}"
            )
        weights[name.strip()] = weight
    if not any(weights.values()):
        raise ConfigError(f"source weights: at least one source needs a positive weight, not {text!r}")
    return weights

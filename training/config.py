"""Training configuration: one dataclass whose defaults are the paper's Table 1."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ARCHITECTURES = ("resnet50v2-unet", "unet")
LOSSES = ("focal", "bce")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


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
    decoder_filters: tuple[int, ...] = field(
        default=(512, 256, 128, 64, 32), metadata={"help": "decoder widths, deepest stage first"}
    )
    unet_base_filters: int = field(default=64, metadata={"help": "plain U-Net: filters of the first level"})
    dropout_rate: float = field(default=0.3, metadata={"help": "dropout in the decoder"})
    loss: str = field(default="focal", metadata={"help": "focal (the paper's eq. 2) or bce"})
    focal_alpha: float = field(default=0.8, metadata={"help": "focal loss alpha"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focal loss gamma"})
    augment: bool = field(default=True, metadata={"help": "on-the-fly geometric augmentation"})
    image_size: int = field(default=224, metadata={"help": "square network input, pixels"})
    batch_size: int = field(default=16, metadata={"help": "images per step"})
    epochs: int = field(default=50, metadata={"help": "maximum epochs"})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    lr_factor: float = field(default=0.2, metadata={"help": "ReduceLROnPlateau factor"})
    lr_patience: int = field(default=5, metadata={"help": "ReduceLROnPlateau patience (epochs)"})
    min_lr: float = field(default=1e-6, metadata={"help": "ReduceLROnPlateau floor"})
    early_stopping_patience: int = field(default=10, metadata={"help": "EarlyStopping patience (epochs)"})
    val_fraction: float = field(default=0.2, metadata={"help": "share of images held out for validation"})
    seed: int = field(default=42, metadata={"help": "seed for the split, the augmentation and the weights"})
    precision: str = field(default="float32", metadata={"help": "float32, mixed_bfloat16 or mixed_float16"})
    workers: int = field(default=2, metadata={"help": "data-loading workers (threads)"})
    steps_per_epoch: int | None = field(
        default=None, metadata={"help": "batches per epoch, repeating the data as needed (default: one pass)"}
    )
    max_images: int | None = field(default=None, metadata={"help": "use only the first N images (tests)"})

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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["decoder_filters"] = list(self.decoder_filters)
        return data

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

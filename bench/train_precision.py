"""``python -m bench.train_precision``: training steps per second of the release network at each precision.

The release recipe trains in ``mixed_bfloat16``, which pays on a CPU with bfloat16 instructions (AVX-512
BF16 or AMX) and is emulated, much slower, on one without. This times ``train_on_batch`` of the release
network (192², batch 16, decoder 256/128/64/32/16, the configured focal loss and Adam) at each precision
given, the precisions taking turns round by round so that both see the same machine, and prints images/s
and each one's ratio to the first. Run it on a quiet machine before choosing ``--precision`` for a long run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np

from training.precision import cpu_has_bfloat16


def _models(precisions: Sequence[str], size: int, batch: int) -> dict[str, object]:
    import keras

    from training.config import TrainConfig
    from training.model import build_model
    from training.train import compile_model

    models = {}
    for precision in precisions:
        keras.mixed_precision.set_global_policy(precision)
        cfg = TrainConfig(image_size=size, batch_size=batch, precision=precision, encoder_weights="none")
        model = build_model(
            cfg.arch,
            input_size=(size, size),
            encoder_weights=None,
            decoder_filters=(256, 128, 64, 32, 16),
            unet_base_filters=cfg.unet_base_filters,
            dropout_rate=cfg.dropout_rate,
        )
        compile_model(model, cfg)
        models[precision] = model
    keras.mixed_precision.set_global_policy("float32")
    return models


def measure(precisions: Sequence[str], size: int, batch: int, rounds: int, steps: int) -> dict[str, object]:
    """Images per second of each precision: the median over ``rounds`` rounds of ``steps`` steps each."""
    rng = np.random.default_rng(0)
    images = rng.random((batch, size, size, 3), dtype=np.float32)
    masks = (rng.random((batch, size, size, 1)) > 0.5).astype(np.float32)
    models = _models(precisions, size, batch)
    for model in models.values():  # tracing and allocation, untimed
        model.train_on_batch(images, masks)
    rates: dict[str, list[float]] = {precision: [] for precision in precisions}
    for _ in range(rounds):
        for precision, model in models.items():
            started = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(images, masks)
            rates[precision].append(steps * batch / (time.perf_counter() - started))
    first = float(np.median(rates[precisions[0]]))
    return {
        "cpu_has_bfloat16": cpu_has_bfloat16(),
        "image_size": size,
        "batch_size": batch,
        "rounds": rounds,
        "steps_per_round": steps,
        "images_per_second": {precision: float(np.median(values)) for precision, values in rates.items()},
        "ratio_to_first": {
            precision: float(np.median(values)) / first for precision, values in rates.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_precision", description=__doc__)
    parser.add_argument("--precisions", nargs="+", default=["float32", "mixed_bfloat16"])
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="training steps per round and precision")
    args = parser.parse_args(argv)
    result = measure(args.precisions, args.image_size, args.batch_size, args.rounds, args.steps)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

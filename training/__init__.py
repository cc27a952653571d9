"""DermaSeg training: data, augmentation, model, losses, metrics, training, evaluation and export."""

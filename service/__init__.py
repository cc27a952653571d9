"""DermaSeg service and inference core (never imports TensorFlow)."""

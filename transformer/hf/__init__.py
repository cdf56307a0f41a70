"""Hugging Face model folders in and out: `configs` maps config.json to a `ModelConfig` and back, `weights`
maps every tensor (names, transposes, head splits, layer stacking, experts), `folder` reads and writes the
safetensors files. `python -m transformer.convert` is the command line."""

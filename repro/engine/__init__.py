"""What trains and evaluates one table row: `config` (the validated YAML), `data` (the Cityscapes / ADE20K /
VOC loaders and transforms, the palettes), `train`, `evaluate`, `metrics`, `distributed`, `runner` (the
`python -m repro.run` command) and `predict` (the `python -m repro.predict` command: colour label maps and
criss-cross attention figures for any images)."""

"""What trains and evaluates one table row: `config` (the validated YAML), `data` (the Cityscapes / ADE20K /
VOC loaders and transforms), `train`, `evaluate`, `metrics`, `distributed`, and `runner` (the
`python -m repro.run` command)."""

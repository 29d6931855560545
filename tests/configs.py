"""Real experiment configs for tests that need a folder of them (report, reproduce): a shipped config with
its name and `reported:` values replaced, so fixtures use exactly the format the loader validates."""

from __future__ import annotations

from pathlib import Path

import yaml

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write_config(folder: Path, name: str, *, base: str = "cityscapes_r2", reported: dict | None = None,
                 comment: str = "", data_root: Path | None = None) -> Path:
    """Write `folder/name.yaml` from `experiments/base.yaml` with `name` and `reported` replaced; `comment` is
    written as a first-line YAML comment (the reproduce tests' stand-in interpreter greps for words in it);
    `data_root` sets `data.root`."""
    raw = yaml.safe_load((EXPERIMENTS / f"{base}.yaml").read_text())
    raw["name"] = name
    if reported is not None:
        raw["reported"] = reported
    if data_root is not None:
        raw["data"]["root"] = str(data_root)
    path = Path(folder) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((f"# {comment}\n" if comment else "") + yaml.safe_dump(raw, sort_keys=False))
    return path

"""The files a newcomer reads first agree with the code and with each other: README (two set-up commands,
the Python version, a backbone download for every config, the generated findings), LICENSE, CITATION.cff."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import yaml

from repro.engine.config import load_config
from repro.pipeline.report import FINDINGS_END, FINDINGS_START, findings_block

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_quick_start_is_two_commands_and_states_the_python_version():
    quick = _section("Quick start")
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert all(line.startswith("python -m pip install nox && python -m nox -s ") for line in commands)
    minimum = re.search(r'requires-python = ">=(\d+\.\d+)"', PYPROJECT).group(1)
    assert f"Python {minimum} or newer" in quick
    assert "minutes" in quick and "2-core" in quick


def test_readme_names_where_every_backbone_comes_from():
    backbones = _section("ImageNet backbones")
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        weights = load_config(path).model.pretrained_backbone
        if weights:
            row = next((line for line in backbones.splitlines() if f"`{weights}`" in line), None)
            assert row is not None, f"{path.name}: README does not say where {weights} comes from"
            assert "https://" in row or "http://" in row
            # The row's "configs" cell names this config (its name or a glob matching it).
            names = re.findall(r"`([^`]+)`", row.split("|")[2])
            assert any(fnmatch.fnmatch(path.stem, name) for name in names), f"{path.name} not in the row of {weights}"


def test_readme_findings_are_what_the_report_writes():
    start, end = README.index(FINDINGS_START), README.index(FINDINGS_END)
    assert README[start + len(FINDINGS_START):end].strip() == findings_block(
        ROOT / "results", ROOT / "experiments").strip(), "run `python -m repro.report` to refresh the README"


def test_license_matches_pyproject():
    assert 'license = { text = "MIT" }' in PYPROJECT
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_citation_file_cites_this_project_and_the_paper():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["type"] == "software"
    assert citation["license"] == "MIT" and citation["authors"]
    version = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)
    assert citation["version"] == version
    (paper,) = citation["references"]
    assert paper["title"] == "CCNet: Criss-Cross Attention for Semantic Segmentation"
    assert paper["doi"] == "10.1109/TPAMI.2020.3007032" and paper["url"] == "https://arxiv.org/abs/1811.11721"

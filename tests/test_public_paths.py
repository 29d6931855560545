"""Nothing tracked points at files a user of the repository does not have: the team's shared folder, the
local copies of the source documents (named NNN_<16 hex digits>.txt), or absolute paths of the machine that
produced it. Results CSVs and the report are included: a committed path must be repository-relative."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Written so that this file does not match itself.
FORBIDDEN = {
    "the team's shared folder": re.compile(r"\.\./shared\b|\bshared/(seeds|NOTES)"),
    "a local source-document file name": re.compile(r"\b0\d\d_[0-9a-f]{16}\.txt"),
    "an absolute path of this machine": re.compile(r"(?<![\w.:/-])/(work|root|tmp|home)/"),
}
BINARY = {".png", ".pt", ".pth", ".jpg", ".pdf"}


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listing.decode().split("\0") if name]


def offending_lines(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append(f"line {number}: {what}: {line.strip()[:160]}")
    return found


def test_patterns_catch_what_they_are_for():
    # Split literals, so that this file does not contain what it looks for.
    assert offending_lines("see ../" + "shared/" + "NOTES.md")
    assert offending_lines('source: "README (seed 0' + '01_11aaf14c4c1f9058.txt)"')
    assert offending_lines("run,/" + "work/main/.nox/reproduce/bin/python -m repro.claims")
    assert offending_lines("saved to /" + "tmp/x.csv")
    assert not offending_lines("https://github.com/open-mmlab/mmsegmentation/tree/main/configs/ccnet")
    assert not offending_lines("python -m repro.claims --out results  # weights shared by the loops")


def test_no_tracked_file_points_outside_the_repository():
    problems = {}
    for path in tracked_files():
        if path.suffix in BINARY or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        lines = offending_lines(text)
        if lines:
            problems[str(path.relative_to(ROOT))] = lines[:3]
    assert not problems, "tracked files point at what a user does not have:\n" + "\n".join(
        f"{name}: {lines}" for name, lines in sorted(problems.items())
    )

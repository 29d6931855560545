"""Atomic file writes and keyed CSV updates: results are never half-written and earlier rows are kept."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upsert_csv(path: str | os.PathLike, rows: pd.DataFrame, key: Sequence[str]) -> pd.DataFrame:
    """Merge `rows` into the CSV at `path`: rows with the same `key` values are replaced, all others kept.

    Columns missing on either side are kept (empty where unknown). Returns the merged table.
    """
    path = Path(path)
    missing = [column for column in key if column not in rows.columns]
    if missing:
        raise ValueError(f"upsert_csv: key columns {missing} are not in the new rows' columns {list(rows.columns)}")
    if path.exists() and path.stat().st_size > 0:
        existing = pd.read_csv(path, keep_default_na=False, dtype=str)
        new_keys = set(rows[list(key)].astype(str).itertuples(index=False, name=None))
        if set(key) <= set(existing.columns):
            existing_keys = existing[list(key)].astype(str).itertuples(index=False, name=None)
            existing = existing[[k not in new_keys for k in existing_keys]]
        merged = pd.concat([existing, rows.astype(str)], ignore_index=True)
    else:
        merged = rows
    atomic_write_text(path, merged.to_csv(index=False))
    return merged

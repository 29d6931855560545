"""Atomic file writes and append-only result files: the one write mechanism of the project.

Every file the project writes (checkpoints, CSVs, figures, reports) goes through a temporary file in the same
directory, flushed and fsynced, given the permissions a plain open() would, and renamed over the target with
`os.replace`, so a crash or Ctrl-C leaves either the old file or the new one, never a truncated mix. This
module sits beside the four rooms of `repro` (not inside one) because all of them write files.

CSV "appends" read the existing rows and rewrite the whole file atomically: earlier rows are never lost, even
when the new rows bring new columns. `upsert_csv` (used by the benchmarks and the profile) replaces rows with
the same key instead of appending.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pandas as pd


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave half-written temporaries behind.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_csv_atomic(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write `frame` (no index) to the CSV at `path` atomically."""
    return atomic_write_text(path, frame.to_csv(index=False))


def atomic_savefig(figure: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """`figure.savefig(path, ...)` atomically; the format is taken from the file suffix. The caller closes it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return _atomic_write(path, lambda f: figure.savefig(f, format=fmt, **savefig_kwargs))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)` through a temporary file and `os.replace`."""
    import torch

    return _atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(model: Any, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write {"state_dict": model.state_dict(), **extra} atomically, creating the folder if needed."""
    return atomic_torch_save({"state_dict": model.state_dict(), **(extra or {})}, path)


def read_csv_rows(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV file; ([], []) when it does not exist."""
    path = Path(path)
    if not path.exists():
        return [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def append_csv_rows(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], *, columns: Sequence[str] | None = None
) -> Path:
    """Append `rows` to the CSV at `path`, keeping every earlier row (atomic rewrite).

    The header is the existing header, then `columns` (if given), then any new keys in row order; a row
    missing a column gets an empty cell. Raises ValueError when a row has a key outside `columns` while
    `columns` is given (a typo in a column name must not silently create a new column).
    """
    rows = [dict(row) for row in rows]
    header, old_rows = read_csv_rows(path)
    for name in columns or ():
        if name not in header:
            header.append(name)
    for row in rows:
        for key in row:
            if columns is not None and key not in columns:
                raise ValueError(f"row key {key!r} is not one of the declared columns {list(columns)}")
            if key not in header:
                header.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in old_rows + rows:
        writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in header})
    return atomic_write_text(path, buffer.getvalue())


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


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON object as a line to `path` (a log: a torn last line on a crash is acceptable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(dict(record), sort_keys=True) + "\n")

"""Atomic file writes and append-only result files: the one write mechanism of the project.

Every file the project writes (checkpoints, CSVs, figures, reports) goes through a temporary file in the same
directory, flushed and fsynced, given the permissions a plain open() would, and renamed over the target with
`os.replace`, so a crash or Ctrl-C leaves either the old file or the new one, never a truncated mix. This
module sits beside the four rooms of `repro` (not inside one) because all of them write files.

CSV "appends" read the existing rows and rewrite the whole file atomically: earlier rows are never lost.
`upsert_csv` (used by the benchmarks and the profile) replaces rows with the same key instead of appending.
Both hold an exclusive lock (`flock` on the CSV's folder) from the read to the rename, so two runs appending to
the same `results/miou.csv` at the same time both keep their rows. An append with declared columns refuses a
file whose header differs (`CsvFormatError` naming the missing and extra columns) instead of mixing layouts.

A failed write (full disk, folder not writable) raises OSError naming the target file; the previous file is
left as it was and no temporary file remains.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pandas as pd

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent appends are then not protected
    fcntl = None


class CsvFormatError(ValueError):
    """A CSV cannot be appended to: its header differs from the declared columns, or it is not a CSV."""


def _write_error(err: OSError, path: Path) -> OSError:
    """The same kind of OSError (errno kept: PermissionError, ENOSPC, ...) naming the file being written."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(err, path) from None
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
    except BaseException as err:
        # Also on KeyboardInterrupt: never leave half-written temporaries behind.
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        cause = _os_error_in(err)
        if cause is not None:
            raise _write_error(cause, path) from None
        interrupt = _interrupt_in(err)
        if interrupt is not None and interrupt is not err:
            # Ctrl-C / SIGTERM during torch.save: its zip writer's cleanup raises a RuntimeError about the file
            # position while handling the interrupt; the interrupt is what happened.
            raise interrupt from None
        raise
    return path


def _interrupt_in(err: BaseException) -> BaseException | None:
    """The KeyboardInterrupt (or subclass) `err` is, or was raised while handling, if any."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, KeyboardInterrupt):
            return err
        err, seen = err.__context__, seen + 1
    return None


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind a failed write: `err` itself, or one it was raised while handling (torch.save turns a
    full disk into a RuntimeError about the zip writer's position, raised from its cleanup)."""
    seen = 0
    while isinstance(err, Exception) and seen < 10:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and check a file can be created in it (before hours of work that end with
    writing there); OSError naming the folder otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise _write_error(err, folder) from None
    return folder


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive advisory lock for a read-modify-write of `path`: `flock` on its folder, so no lock
    file is left behind; other processes using `locked` on a file of the same folder wait (briefly)."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(err, Path(path)) from None
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
    """The header and rows of a CSV file; ([], []) when it does not exist. CsvFormatError when it is not a
    readable CSV (not UTF-8, a row with more cells than the header)."""
    path = Path(path)
    if not path.exists():
        return [], []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise CsvFormatError(f"{path} is not a readable CSV: {err}") from None
    for number, row in enumerate(rows, start=2):
        if None in row:
            raise CsvFormatError(f"{path}: line {number} has more cells than the header {header}")
    return header, rows


def check_csv_header(path: str | os.PathLike, columns: Sequence[str]) -> None:
    """CsvFormatError naming the missing and extra columns when the CSV at `path` exists with a header other
    than `columns` (any order); nothing when it does not exist yet."""
    header, _ = read_csv_rows(path)
    missing = [name for name in columns if name not in header]
    extra = [name for name in header if name not in columns]
    if header and (missing or extra):
        raise CsvFormatError(
            f"{path}: header does not match, nothing appended: missing columns {missing}, extra columns "
            f"{extra} (expected {list(columns)}); move the file aside or fix its header"
        )


def append_csv_rows(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], *, columns: Sequence[str] | None = None
) -> Path:
    """Append `rows` to the CSV at `path`, keeping every earlier row (atomic rewrite under `locked`).

    With `columns`, a new file gets exactly that header; an existing file must have those columns (in any
    order) and no others, or CsvFormatError names the missing and extra ones and nothing is written. A row key
    outside `columns` raises ValueError (a typo in a column name must not create a new column); a row missing
    a column gets an empty cell. Without `columns` the header is the existing one, then new keys in row order.
    """
    rows = [dict(row) for row in rows]
    path = Path(path)
    for row in rows:
        for key in row:
            if columns is not None and key not in columns:
                raise ValueError(f"row key {key!r} is not one of the declared columns {list(columns)}")
    with locked(path):
        if columns is not None:
            check_csv_header(path, columns)
        header, old_rows = read_csv_rows(path)
        for name in columns or ():
            if name not in header:
                header.append(name)
        for row in rows:
            for key in row:
                if key not in header:
                    header.append(key)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        for row in old_rows + rows:
            writer.writerow({key: ("" if row.get(key) is None else row.get(key)) for key in header})
        return atomic_write_text(path, buffer.getvalue())


def upsert_csv(path: str | os.PathLike, rows: pd.DataFrame, key: Sequence[str],
               columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Merge `rows` into the CSV at `path`: rows with the same `key` values are replaced, all others kept.

    Columns missing on either side are kept (empty where unknown); with `columns`, those come first, in that
    order (a column added to a writer's list takes its place instead of going last). Returns the merged table.
    """
    path = Path(path)
    missing = [column for column in key if column not in rows.columns]
    if missing:
        raise ValueError(f"upsert_csv: key columns {missing} are not in the new rows' columns {list(rows.columns)}")
    with locked(path):
        if path.exists() and path.stat().st_size > 0:
            try:
                existing = pd.read_csv(path, keep_default_na=False, dtype=str)
            except (UnicodeDecodeError, pd.errors.ParserError) as err:
                raise CsvFormatError(f"{path} is not a readable CSV: {str(err).strip()}") from None
            new_keys = set(rows[list(key)].astype(str).itertuples(index=False, name=None))
            if set(key) <= set(existing.columns):
                existing_keys = existing[list(key)].astype(str).itertuples(index=False, name=None)
                existing = existing[[k not in new_keys for k in existing_keys]]
            merged = pd.concat([existing, rows.astype(str)], ignore_index=True)
        else:
            merged = rows
        if columns is not None:
            merged = merged[[c for c in columns if c in merged.columns]
                            + [c for c in merged.columns if c not in columns]]
        atomic_write_text(path, merged.to_csv(index=False))
    return merged


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON object as a line to `path` (a log: a torn last line on a crash is acceptable, and the
    next record starts on a line of its own so it stays readable). One write call in append mode, so lines of
    concurrent writers do not interleave."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(dict(record), sort_keys=True) + "\n").encode("utf-8")
    with path.open("a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end > 0:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)

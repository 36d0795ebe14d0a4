"""read_rows: the rows of a JSON Lines or Parquet file (or a directory of them), each with the
place it came from, so a bad row can be reported as `file:line` (JSONL) or `file:row i` (Parquet).
"""
from __future__ import annotations

import codecs
import json
import os
import sys
import tempfile

from megaswift.errors import DataError

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


def read_rows(path: str) -> list[tuple[str, dict]]:
    """(where, row) for every row of `path`: a .jsonl/.json/.parquet file, or a directory whose
    such files (top level only) are read in name order."""
    if not os.path.exists(path):
        raise DataError(f"data.path {path!r} does not exist: point data.path at a .jsonl/.parquet file or a directory")
    files = _data_files(path)
    rows = [r for f in files for r in _read_file(f)]
    if not rows:
        raise DataError(f"data.path {path!r} holds no rows: {len(files)} file(s), all empty")
    return rows


def _data_files(path: str) -> list[str]:
    if not os.path.isdir(path):
        if not path.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES):
            raise DataError(f"data file {path!r} is neither JSON Lines (.jsonl, .json) nor Parquet (.parquet)")
        return [path]
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    files = [os.path.join(path, n) for n in names if n.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES)]
    if not files:
        raise DataError(f"data directory {path!r} has no .jsonl, .json or .parquet files")
    others = [n for n in names if not n.endswith(JSON_SUFFIXES + PARQUET_SUFFIXES) and not n.startswith(".")]
    if others and os.environ.get("RANK", "0") == "0":  # a .csv left beside the data is not read: say so
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        print(f"megaswift: warning: data.path {path}: {len(others)} file(s) of other types not read: {shown} "
              f"(megaswift reads .jsonl, .json and .parquet)", file=sys.stderr, flush=True)
    return files


def _check_utf8(file: str) -> None:
    """JSON is UTF-8; a file that is not would be read with U+FFFD in place of the bad bytes,
    silently changing the text that trains. Decoded in large blocks; the line is found only when
    a block fails."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = 0
    with open(file, "rb") as f:
        while block := f.read(1 << 24):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:  # e.object: the decoder's pending bytes, then this block
                line = lines_before + e.object.count(b"\n", 0, e.start) + 1
                raise DataError(f"{file}:{line}: not valid UTF-8 (byte {e.object[e.start:e.start + 1]!r}); save the "
                                f"file as UTF-8") from None
            lines_before += block.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{file}:{lines_before + 1}: not valid UTF-8 (the file ends inside a character); save "
                        f"the file as UTF-8") from None


def _read_file(file: str) -> list[tuple[str, dict]]:
    if file.endswith(JSON_SUFFIXES):
        _check_utf8(file)
    try:
        import datasets
        from datasets.utils import logging as ds_logging
    except ImportError:  # a bare environment (a GPU image with torch and transformers only)
        if file.endswith(".jsonl"):
            return _read_json_lines(file)
        raise DataError(f"{file}: reading .json arrays and Parquet needs the datasets package (pip install "
                        f"datasets); .jsonl files are read without it") from None

    is_json = file.endswith(JSON_SUFFIXES)
    reader = datasets.Dataset.from_json if is_json else datasets.Dataset.from_parquet
    # A private cache per call: several ranks load the same file at once and must not share
    # (or race on) the lock files of a common cache, nor leave Arrow copies in ~/.cache.
    # keep_in_memory lets the table outlive the directory.
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # one bar per rank per file is noise
    try:
        with tempfile.TemporaryDirectory(prefix="megaswift-data-") as cache:
            table = reader(file, keep_in_memory=True, cache_dir=cache).to_list()
    except Exception as e:  # datasets wraps parser errors in its own types
        if is_json:
            return _read_json_lines(file)
        raise DataError(f"{file}: cannot be read as Parquet: {_root_cause(e)}") from e
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    rows = [_drop_none(r) for r in table]
    return list(zip(_wheres(file, len(rows), is_json), rows))


def _drop_none(x):
    """Arrow gives every struct in a column the union of all keys, filling the absent ones with
    None; drop them so a row (and what a chat template sees) is what the file holds."""
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


def _wheres(file: str, n: int, is_json: bool) -> list[str]:
    if is_json:
        # The JSON reader skips blank lines, so row i sits on the i-th non-blank physical line.
        with open(file, encoding="utf-8") as f:
            lines = [i for i, line in enumerate(f, start=1) if line.strip()]
        if len(lines) == n:
            return [f"{file}:{i}" for i in lines]
        # A .json file holding one array: rows are not lines, so fall back to row numbers.
    return [f"{file}:row {i}" for i in range(n)]


def _read_json_lines(file: str) -> list[tuple[str, dict]]:
    """The rows by plain json.loads, for when datasets gives up: it then names neither the line
    of a syntax error nor a row whose types clash with the others (which the row checks in
    chat.py report by line), and it refuses an empty file instead of returning no rows."""
    rows = []
    with open(file, encoding="utf-8") as f:  # _check_utf8 has passed
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{i}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise DataError(f"{file}:{i}: expected a JSON object per line, got {type(row).__name__}")
            rows.append((f"{file}:{i}", row))
    return rows


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"

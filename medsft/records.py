"""Reading rows from .jsonl/.json/.csv/.parquet with errors that name file and line, and atomic writes."""
import csv
import json
import os
import tempfile
from pathlib import Path

from medsft.errors import DataError, UserError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_rows(path) -> list[tuple[int, dict]]:
    """(line number, row) pairs of a data file; a malformed file raises DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"error: {path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UserError(f"error: {path}: unsupported file type {suffix!r} (use one of {', '.join(SUPPORTED_SUFFIXES)})")
    if suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        text = _read_utf8(path)
        if not text.strip():
            raise DataError(path, None, "the file is empty")
        rows = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}[suffix](path, text)
    if not rows:
        raise DataError(path, None, "the file has no rows")
    return rows


def read_jsonl(path) -> list[tuple[int, dict]]:
    """Like read_rows, for a .jsonl file whatever its name; an empty file gives no rows."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"error: {path}: no such file")
    text = _read_utf8(path)
    return _parse_jsonl(path, text) if text.strip() else []


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(path, line, f"not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _parse_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, number, _json_problem(e)) from None
        if not isinstance(row, dict):
            raise DataError(path, number, f"expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _json_problem(error: json.JSONDecodeError) -> str:
    # some messages end in "at" already ("Unterminated string starting at")
    return f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"


def _parse_json(path: Path, text: str) -> list[tuple[int, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, _json_problem(e)) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(path, None, "expected a JSON list of objects (or JSON Lines in a .jsonl file)")
    for number, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(path, number, f"expected a JSON object, got {type(row).__name__}", unit="item")
    return list(enumerate(data, start=1))


def _parse_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    lines = text.splitlines(keepends=True)
    reader = csv.DictReader(lines, strict=True)
    rows, end = [], 1  # end: the last line read so far (the header's)
    try:
        for row in reader:
            start, end = end + 1, reader.line_num  # a row starts on the line after the last one read,
            while start < end and not lines[start - 1].strip():  # past blank lines the reader skipped
                start += 1
            if None in row:
                raise DataError(path, start, "more fields than the header has")
            metrics = {k.split(".", 1)[1]: _number(v) for k, v in row.items() if k.startswith("metrics.") and v}
            meta = {k.split(".", 1)[1]: v for k, v in row.items() if k.startswith("meta.") and v}
            row = {k: v for k, v in row.items() if not k.startswith(("metrics.", "meta."))}
            if metrics:
                row["metrics"] = metrics
            if meta:
                row["meta"] = meta
            rows.append((start, row))
    except csv.Error as e:  # the reader stops before counting the broken row's lines: it starts after the last good one
        raise DataError(path, reader.line_num + 1, f"invalid CSV in the row starting on this line ({e})") from None
    return rows


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for broken files
        raise DataError(path, None, f"cannot read Parquet ({e})") from None
    records = json.loads(frame.to_json(orient="records", force_ascii=False))
    return list(enumerate(records, start=1))


def jsonl_text(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_shareable(folder) -> None:
    """Give a folder and everything in it the modes the umask gives (0755/0644 under 022).

    tempfile.mkdtemp and safetensors (which writes through a temporary file) make owner-only 0700/0600 files;
    a model or adapter folder is shared with a team or a server's user.
    """
    folder, umask = Path(folder), _umask()
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_files_atomically(files: dict, remove=()) -> None:
    """Write {path: text or bytes} so that readers see all the old files or all the new ones, never a half-written file.

    Every file is first written to a temporary file beside it; only when all are written are they renamed
    into place. `remove` lists stale files (e.g. a test split no longer wanted) deleted after the renames.
    """
    temps = {}
    try:
        for path, text in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps[path] = temp
            os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
            binary = isinstance(text, bytes)
            with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for temp in temps.values():
            Path(temp).unlink(missing_ok=True)
        raise
    try:
        for path in list(temps):
            os.replace(temps.pop(path), path)
    finally:  # a failed rename leaves no temporary files behind
        for temp in temps.values():
            Path(temp).unlink(missing_ok=True)
    for path in remove:
        Path(path).unlink(missing_ok=True)

"""Row checks, de-duplication and the deterministic split behind data.py."""
import hashlib
import math
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

from medsft.chat_format import clean_think, normalise_text
from medsft.errors import DataError, UserError
from medsft.records import SUPPORTED_SUFFIXES, read_rows

REQUIRED_FIELDS = ("question", "think", "answer")
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


METADATA_FILES = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "configuration.json", "state.json"}


def find_data_files(folder: Path) -> list[Path]:
    """The data files of a downloaded dataset: .jsonl/.parquet/.csv; .json only when there are none of those."""
    candidates = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                        and p.name.lower() not in METADATA_FILES
                        and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    files = [p for p in candidates if p.suffix.lower() != ".json"] or candidates
    if not files:
        raise UserError(f"error: {folder}: no {'/'.join(SUPPORTED_SUFFIXES)} data file in the downloaded dataset")
    return files


def check_row(row: dict) -> tuple[dict | None, str | None, str | None]:
    """(clean row, None, None) for a good row, else (None, reason key, message)."""
    clean = {}
    for field in REQUIRED_FIELDS:
        value = row.get(field)
        if value is None:
            return None, f"missing_{field}", f"missing field '{field}'"
        if not isinstance(value, str):
            return None, f"bad_type_{field}", f"field '{field}' must be a string, got {type(value).__name__}"
        value = clean_think(value) if field == "think" else normalise_text(value)
        if not value:
            return None, f"empty_{field}", f"field '{field}' is empty"
        clean[field] = value
    instruction = row.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        return None, "bad_type_instruction", f"field 'instruction' must be a string, got {type(instruction).__name__}"
    metrics = row.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        return None, "bad_type_metrics", f"field 'metrics' must be an object, got {type(metrics).__name__}"
    return {"id": question_key(clean["question"])[:12], "instruction": instruction or "", **clean,
            "metrics": metrics or {}}, None, None


def question_key(question: str) -> str:
    """Hash of the question after normalisation: width, case, spaces and punctuation do not matter."""
    folded = _NOT_WORD.sub("", unicodedata.normalize("NFKC", question).casefold())
    return hashlib.sha1(folded.encode("utf-8")).hexdigest()


def load_checked_rows(paths: list[Path], on_bad_row: str) -> tuple[list[dict], Counter, int]:
    """Good rows of all files, the dropped rows by reason and the number of rows read."""
    rows, dropped, read, problems = [], Counter(), 0, []
    for path in paths:
        unit = "line" if path.suffix.lower() in (".jsonl", ".csv") else "row"
        for number, raw in read_rows(path):
            read += 1
            row, reason, message = check_row(raw)
            if row is None:
                if on_bad_row == "error":
                    problems.append((path, number, message, unit))
                    if len(problems) == 10:
                        break
                dropped[reason] += 1
                continue
            rows.append(row)
    if problems:  # the first problem names file and line; the others follow, up to 10
        path, number, message, unit = problems[0]
        others = [DataError(*p[:3], unit=p[3]).message for p in problems[1:]]
        more = "\n(stopped after 10 problems)" if len(problems) == 10 else ""
        raise DataError(path, number, "\n".join([message, *others]) + more
                        + "\nFix the rows, or pass --on_bad_row=skip to drop them.", unit=unit)
    return rows, dropped, read


def drop_duplicate_questions(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first row of each normalised question, so no question can land in two splits."""
    seen, kept = set(), []
    for row in rows:
        key = question_key(row["question"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def split_rows(rows: list[dict], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(rows) * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(len(rows) * test_fraction)) if test_fraction > 0 else 0
    if len(rows) - n_val - n_test < 1:
        raise UserError(f"error: {len(rows)} rows are too few for val_fraction={val_fraction} "
                        f"and test_fraction={test_fraction}")
    shuffled = [rows[i] for i in order]
    splits = {"val": shuffled[:n_val], "train": shuffled[n_val + n_test:]}
    if test_fraction > 0:
        splits["test"] = shuffled[n_val:n_val + n_test]
    return splits


def quality_score(row: dict) -> float | None:
    """metrics.quality_f1 when it is a finite number, else None."""
    score = row["metrics"].get("quality_f1")
    rated = isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
    return float(score) if rated else None


def pick_gold_rows(held_out: list[dict], size: int) -> list[dict]:
    """The `size` held-out rows with the highest metrics.quality_f1; ties by id, then question; unrated rows last."""
    def rank(row):
        score = quality_score(row)
        return (score is None, -(score or 0.0), row["id"], row["question"])

    if size > len(held_out):
        raise UserError(f"error: gold_size={size} but there are only {len(held_out)} held-out (val and test) rows; "
                        "lower --gold_size or raise --val_fraction / --test_fraction")
    return sorted(held_out, key=rank)[:size]

"""Reading rows through their schema, the originals' split, and the cleaning after it, behind data.py."""
import hashlib
import math
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medsft.chat_format import clean_think, normalise_text
from medsft.errors import DataError, UserError
from medsft.records import SUPPORTED_SUFFIXES, read_rows
from medsft.schemas import (RowProblem, check_turn_keys, conversation, opening_question, reader_for, replies,
                            single_turn, text_field)

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
    """(clean row with its id, None, None) for a good internal row (a split file's), else (None, reason, message)."""
    try:
        if "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise RowProblem("bad_messages", "field 'messages' must be a list of objects")
            clean = conversation([_checked_message(m.get("role"), m.get("content"), m.get("think"),
                                                   f"messages item {i}") for i, m in enumerate(messages, start=1)], row)
        else:
            think = row.get("think")
            if think is not None and not isinstance(think, str):
                raise RowProblem("bad_type_think", f"field 'think' must be a string, got {type(think).__name__}")
            if think is None:
                raise RowProblem("missing_think", "missing field 'think' (\"\" for a reply without reasoning)")
            clean = single_turn(row, text_field(row, "question"), "answer", None,
                                text_field(row, "instruction", required=False))
            clean["think"] = clean_think(think) or clean["think"]
    except RowProblem as problem:
        return None, problem.reason, problem.message
    return {"id": question_key(opening_question(clean))[:12], **clean}, None, None


def _checked_message(role, content, think, where: str) -> dict:
    if role not in ("system", "user", "assistant") or not isinstance(content, str):
        raise RowProblem("bad_turn", f"{where}: needs role system, user or assistant and a string content")
    if role != "assistant":
        return {"role": role, "content": normalise_text(content)}
    if not isinstance(think, str):
        raise RowProblem("bad_turn", f"{where}: an assistant turn needs a string 'think' (\"\" for none)")
    return {"role": role, "content": normalise_text(content), "think": clean_think(think)}


def question_key(question: str) -> str:
    """Hash of the question after normalisation: width, case, spaces and punctuation do not matter."""
    folded = _NOT_WORD.sub("", unicodedata.normalize("NFKC", question).casefold())
    return hashlib.sha1(folded.encode("utf-8")).hexdigest()


@dataclass
class ReadRow:
    """One row as read, good (row) or bad (reason, message), where it came from, and its raw fields."""
    row: dict | None
    reason: str | None
    where: tuple
    raw: dict


def read_source(paths: list[Path], on_bad_row: str, schema: str = "auto", mapping: dict | None = None
                ) -> tuple[list[ReadRow], dict]:
    """Every row of every file in reading order, each through its file's schema reader; {file: schema name}.

    A missing or misnamed column stops at once in one line; with on_bad_row="error" bad rows stop it too
    (the first names file and line, up to 10 follow), else they are kept as bad and dropped after the split.
    """
    read, schemas, problems = [], {}, []
    for path in paths:
        unit = "line" if path.suffix.lower() in (".jsonl", ".csv") else "row"
        raws = read_rows(path)
        columns = set().union(*(raw.keys() for _, raw in raws))
        schemas[str(path)], reader = reader_for(path, columns, schema, mapping)
        check_turn_keys(path, schemas[str(path)], raws)
        for number, raw in raws:
            try:
                row, reason, message = reader(raw), None, None
            except RowProblem as problem:
                row, reason, message = None, problem.reason, problem.message
            if row is not None:
                row, reason, message = check_row(row)
            if row is None and on_bad_row == "error":
                problems.append((path, number, message, unit))
                if len(problems) == 10:
                    break
            read.append(ReadRow(row, reason, (str(path), number), raw))
        if len(problems) == 10:
            break
    if problems:  # the first problem names file and line; the others follow, up to 10
        path, number, message, unit = problems[0]
        others = [DataError(*p[:3], unit=p[3]).message for p in problems[1:]]
        more = "\n(stopped after 10 problems)" if len(problems) == 10 else ""
        raise DataError(path, number, "\n".join([message, *others]) + more
                        + "\nFix the rows, or pass --on_bad_row=skip to drop them.", unit=unit)
    return read, schemas


def split_as_originals(rows: list, val_fraction: float, test_fraction: float, seed: int,
                       strata: list | None = None) -> dict[str, list]:
    """The originals' split of the rows as read: random.seed(seed); random.shuffle(rows); then
    train = [:int(n*(1-v-t))], val = [int(n*(1-v-t)):int(n*(1-t))], test = [int(n*(1-t)):].

    With `strata` (one value per row) each stratum's share of val and test is within one row of its share of
    all rows: its rows, in shuffled order, go to val and test by largest remainders, the rest to train.
    """
    n = len(rows)
    order = list(range(n))
    random.Random(seed).shuffle(order)  # the same permutation as random.seed(seed); random.shuffle(rows)
    train_end = int(n * round(1 - val_fraction - test_fraction, 12))
    val_end = int(n * round(1 - test_fraction, 12)) if test_fraction > 0 else n
    if train_end < 1 or (val_fraction > 0 and val_end <= train_end) or (test_fraction > 0 and val_end >= n):
        raise UserError(f"error: {n} rows are too few for val_fraction={val_fraction} "
                        f"and test_fraction={test_fraction}")
    if strata is None:
        shuffled = [rows[i] for i in order]
        splits = {"val": shuffled[train_end:val_end], "train": shuffled[:train_end]}
        if test_fraction > 0:
            splits["test"] = shuffled[val_end:]
        return splits
    by_stratum = {}
    for i in order:
        by_stratum.setdefault(strata[i], []).append(i)
    val_counts = _apportion({s: len(ids) for s, ids in by_stratum.items()}, val_end - train_end, n)
    left = {s: len(ids) - val_counts[s] for s, ids in by_stratum.items()}
    test_counts = _apportion({s: len(ids) for s, ids in by_stratum.items()}, n - val_end, n, cap=left)
    chosen = {"val": set(), "test": set()}
    for s, ids in by_stratum.items():
        chosen["val"].update(ids[: val_counts[s]])
        chosen["test"].update(ids[val_counts[s] : val_counts[s] + test_counts[s]])
    splits = {"val": [rows[i] for i in order if i in chosen["val"]],
              "train": [rows[i] for i in order if i not in chosen["val"] and i not in chosen["test"]]}
    if test_fraction > 0:
        splits["test"] = [rows[i] for i in order if i in chosen["test"]]
    return splits


def _apportion(sizes: dict, total: int, n: int, cap: dict | None = None) -> dict:
    """Largest-remainder shares of `total` in proportion to `sizes` (each the floor or ceiling of its quota)."""
    quotas = {s: size * total / n for s, size in sizes.items()}
    counts = {s: min(math.floor(q), (cap or sizes)[s]) for s, q in quotas.items()}
    for s in sorted(quotas, key=lambda s: (-(quotas[s] - math.floor(quotas[s])), str(s))):
        if sum(counts.values()) >= total:
            break
        if counts[s] < (cap or sizes)[s]:
            counts[s] += 1
    return counts


def clean_splits(splits: dict[str, list[ReadRow]]) -> tuple[dict[str, list[dict]], dict]:
    """Drop bad rows from the split they fell in, then from train the rows whose question is in val or test or
    earlier in train. Val and test rows never move. Returns the clean splits and {split: {reason: count}}."""
    dropped = {name: Counter() for name in splits}
    good = {}
    for name, rows in splits.items():
        good[name] = [r.row for r in rows if r.row is not None]
        dropped[name].update(r.reason for r in rows if r.row is None)
    held_out = {}
    for name in ("val", "test"):
        for row in good.get(name, []):
            held_out.setdefault(question_key(opening_question(row)), name)
    seen, kept = set(), []
    for row in good["train"]:
        key = question_key(opening_question(row))
        if key in held_out:
            dropped["train"][f"duplicate_of_{held_out[key]}"] += 1
        elif key in seen:
            dropped["train"]["duplicate_in_train"] += 1
        else:
            seen.add(key)
            kept.append(row)
    good["train"] = kept
    return good, {name: dict(sorted(c.items())) for name, c in dropped.items() if c}


def held_out_duplicates(splits: dict[str, list[dict]]) -> int:
    """Rows of val and test whose question is already earlier in val or test (kept: those splits never move)."""
    keys = [question_key(opening_question(r)) for name in ("val", "test") for r in splits.get(name, [])]
    return len(keys) - len(set(keys))


def stratum_of(raw: dict, field: str):
    """The value of STRATIFY_BY in a raw row: a column of that name, else a dotted path (meta.specialty)."""
    if field in raw:
        return _hashable(raw[field])
    value = raw
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return _hashable(value)


def _hashable(value):
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def no_reasoning_replies(rows: list[dict]) -> tuple[int, int]:
    """(replies without reasoning, all replies) of the rows: trained with an empty <think></think>."""
    all_replies = [reply for row in rows for reply in replies(row)]
    return sum(not reply["think"] for reply in all_replies), len(all_replies)


def quality_score(row: dict) -> float | None:
    """metrics.quality_f1 when it is a finite number, else None."""
    score = row.get("metrics", {}).get("quality_f1")
    rated = isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)
    return float(score) if rated else None


def pick_gold_rows(held_out: list[dict], size: int) -> list[dict]:
    """The `size` held-out rows with the highest metrics.quality_f1; ties by id, then question; unrated rows last."""
    def rank(row):
        score = quality_score(row)
        return (score is None, -(score or 0.0), row["id"], opening_question(row))

    if size > len(held_out):
        raise UserError(f"error: gold_size={size} but there are only {len(held_out)} held-out (val and test) rows; "
                        "lower --gold_size or raise --val_fraction / --test_fraction")
    return sorted(held_out, key=rank)[:size]

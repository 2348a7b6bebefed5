"""Multiple-choice exam files, checked and turned into one row shape for the task templates in eval_tasks/.

Layouts read (one row per question):
- JSONL: {"question": ..., "options": {"A": ..., "B": ..., ...up to "E"}, "answer": "C"}
- CSV in CMMLU's layout: Question,A,B,C,D,Answer (the official files also have an unnamed index column first)
- CSV in C-Eval's layout: id,question,A,B,C,D,answer[,explanation]
- Parquet with either CSV layout's columns (a hub mirror of CMMLU or C-Eval)
Every layout becomes {"question", "choices": [text, ...], "label": index of the answer, "line": where it was}
(and "id", when the file has one).
A missing option, an answer that is not one of the options or a malformed line stops with one line naming the
file and the line (medsft.errors.DataError), before any model loads.
"""
from pathlib import Path

from medsft.errors import DataError, UserError
from medsft.records import read_jsonl, read_rows

LETTERS = "ABCDE"
EXAM_SUFFIXES = (".jsonl", ".csv", ".parquet")

# where each benchmark's official files are, for the messages and the READMEs
DOWNLOADS = {
    "cmmlu": "https://huggingface.co/datasets/haonan-li/cmmlu/resolve/main/cmmlu_v1_0_1.zip "
             "(or github.com/haonan-li/CMMLU, data/)",
    "ceval": "https://huggingface.co/datasets/ceval/ceval-exam/resolve/main/ceval-exam.zip",
}


def read_exam_file(path) -> list[dict]:
    """The questions of one exam file as {"question", "choices", "label", "line"} rows."""
    path = Path(path)
    if path.suffix.lower() not in EXAM_SUFFIXES:
        raise UserError(f"error: {path}: an exam file must be .jsonl (question/options/answer), or .csv or "
                        f".parquet (CMMLU's Question,A,B,C,D,Answer or C-Eval's id,question,A,B,C,D,answer)")
    if path.suffix.lower() == ".jsonl":
        rows = read_jsonl(path)
        if not rows:
            raise DataError(path, None, "the file has no questions")
        return [_from_options_row(path, line, row) for line, row in rows]
    rows = read_rows(path)
    unit = "row" if path.suffix.lower() == ".parquet" else "line"
    columns = _table_columns(path, rows[0][1])
    return [_from_table_row(path, line, row, columns, unit) for line, row in rows]


def _from_options_row(path: Path, line: int, row: dict) -> dict:
    question, options, answer = row.get("question"), row.get("options"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DataError(path, line, "'question' must be a non-empty string")
    if not isinstance(options, dict) or not options:
        raise DataError(path, line, "'options' must be an object such as {\"A\": \"...\", \"B\": \"...\"}")
    letters = sorted(options)
    if any(key not in LETTERS for key in letters):
        raise DataError(path, line, f"option names must be letters A-{LETTERS[-1]}, not {letters}")
    return _checked_row(path, line, question, [options.get(letter) for letter in LETTERS[: LETTERS.index(letters[-1]) + 1]],
                        answer, ident=row.get("id"))


def _table_columns(path: Path, first: dict) -> dict:
    """{'question': column, 'answer': column} of a CMMLU- or C-Eval-layout table (names' case ignored)."""
    names = {str(name).strip().lower(): name for name in first}
    missing = [name for name in ("question", "a", "b", "c", "d", "answer") if name not in names]
    if missing:
        raise DataError(path, 1, "expected the columns Question,A,B,C,D,Answer (CMMLU) or "
                        f"id,question,A,B,C,D,answer (C-Eval); missing {', '.join(m.upper() if len(m) == 1 else m for m in missing)}")
    return {"question": names["question"], "answer": names["answer"], "id": names.get("id"),
            "options": [names[letter.lower()] for letter in LETTERS if letter.lower() in names]}


def _from_table_row(path: Path, line: int, row: dict, columns: dict, unit: str) -> dict:
    options = [row.get(column) for column in columns["options"]]
    if len(options) == 5 and options[4] in (None, ""):
        options = options[:4]  # an E column left empty: a four-option question
    return _checked_row(path, line, row.get(columns["question"]), options, row.get(columns["answer"]), unit,
                        row.get(columns["id"]) if columns["id"] else None)


def _checked_row(path: Path, line: int, question, options: list, answer, unit: str = "line", ident=None) -> dict:
    def fail(problem):
        raise DataError(path, line, problem, unit=unit)

    if not isinstance(question, str) or not question.strip():
        fail("the question is empty")
    texts = []
    for letter, text in zip(LETTERS, options):
        if isinstance(text, (int, float)) and not isinstance(text, bool) and text == text:  # a number read from a table
            text = format(text, "g")
        if not isinstance(text, str) or not text.strip():
            fail(f"option {letter} is missing")
        texts.append(text.strip())
    if len(texts) < 2:
        fail("a question needs at least two options")
    letters = LETTERS[: len(texts)]
    answer = answer.strip().upper() if isinstance(answer, str) else answer
    if not isinstance(answer, str) or len(answer) != 1 or answer not in letters:
        fail(f"the answer {answer!r} is not one of the options {', '.join(letters)}")
    row = {"question": question.strip(), "choices": texts, "label": letters.index(answer), "line": line}
    return row | ({"id": str(ident)} if ident not in (None, "") else {})


def find_subject_file(exam_dir, benchmark: str, subject: str, split: str) -> Path | None:
    """The file of one subject under exam_dir, in the official zip's layout or a parquet mirror's:
    CMMLU test/<subject>.csv, C-Eval val/<subject>_val.csv, <subject>/<split>-*.parquet, <split>/<subject>.parquet;
    the path must name the benchmark ("cmmlu" or "ceval") somewhere, e.g. exams/cmmlu/test/anatomy.csv."""
    found = []
    for path in sorted(Path(exam_dir).rglob("*")):
        rel = path.relative_to(exam_dir)
        if path.suffix.lower() not in (".csv", ".parquet") or not path.is_file():
            continue
        if benchmark not in str(path.resolve()).lower().replace("-", "").replace("_", ""):
            continue
        stem, parent = path.stem.lower(), path.parent.name.lower()
        in_split_folder = parent == split and stem in (subject, f"{subject}_{split}")
        in_subject_folder = parent == subject and stem.startswith(split) or (
            parent == split and len(rel.parts) > 2 and rel.parts[-3].lower() == subject)
        if in_split_folder or in_subject_folder:
            found.append(path)
    return found[0] if found else None

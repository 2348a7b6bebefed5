"""Multiple-choice exam files, checked and turned into one row shape for the task templates in eval_tasks/.

Layouts read (one row per question), each recognised from its columns or named with EXAM_FORMAT:
- "options": our JSONL: {"question": ..., "options": {"A": ..., ...up to "E"}, "answer": "C" (or "AC"),
  "subject": optional}
- "cmmlu": CSV or parquet in CMMLU's layout (Question,A,B,C,D,Answer, an unnamed index column first) or
  C-Eval's (id,question,A,B,C,D,answer[,explanation])
- "cmb": CMB-Exam (FreedomIntelligence/CMB), a JSON list (or JSONL) of {"exam_type", "exam_class",
  "exam_subject", "question", "answer": "AB", "question_type": 单项选择题/多项选择题, "option": {"A": ...}};
  the subject is exam_class
- "cmexam": CMExam (williamliujl/CMExam), CSV with Question, Options ("A 文本" per line), Answer ("A" or "ABD"),
  Explanation and its annotation columns; the subject is Medical Discipline (or Clinical Department)
- "medqa": MedQA (jind11/MedQA, questions/Mainland = MCMLE), JSONL of {"question", "options": {"A".."E"},
  "answer": the answer's TEXT, "answer_idx": "C", "meta_info"}; the answer text must be the option's
Every layout becomes {"question", "choices": [text, ...], "answer": letters ("C", or "AB" for a multiple-answer
question), "label": index of the first answer letter, "subject", "line": where it was} (and "id", when the
file has one). A missing option, an answer that is not one of the options or a malformed line stops with one
line naming the file and the line (medsft.errors.DataError), before any model loads.
"""
import json
import random
import re
from pathlib import Path

from medsft.errors import DataError, UserError
from medsft.records import read_jsonl, read_rows

LETTERS = "ABCDE"
EXAM_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = ("auto", "options", "cmmlu", "cmb", "cmexam", "medqa")
# the report's name of each layout's exam
EXAM_NAMES = {"cmb": "CMB-Exam", "cmexam": "CMExam", "medqa": "MedQA-MCMLE"}

# where each benchmark's official files are, for the messages and the READMEs
DOWNLOADS = {
    "cmmlu": "https://huggingface.co/datasets/haonan-li/cmmlu/resolve/main/cmmlu_v1_0_1.zip "
             "(or github.com/haonan-li/CMMLU, data/)",
    "ceval": "https://huggingface.co/datasets/ceval/ceval-exam/resolve/main/ceval-exam.zip",
    "cmb": "github.com/FreedomIntelligence/CMB (data/CMB.zip; or the hub's FreedomIntelligence/CMB, exam)",
    "cmexam": "github.com/williamliujl/CMExam (data/: train.csv, val.csv, test.csv)",
    "medqa": "github.com/jind11/MedQA (its Google Drive data: data_clean/questions/Mainland/test.jsonl)",
}


def read_exam_file(path, exam_format: str = "auto") -> list[dict]:
    """The questions of one exam file as {"question", "choices", "answer", "label", "subject", "line"} rows."""
    return read_exam(path, exam_format)[1]


def read_exam(path, exam_format: str = "auto") -> tuple[str, list[dict]]:
    """(the file's layout, its rows): see read_exam_file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXAM_SUFFIXES:
        raise UserError(f"error: {path}: an exam file must be .jsonl or .json (ours, CMB-Exam, MedQA), or .csv or "
                        ".parquet (CMMLU, C-Eval, CMExam)")
    if exam_format not in FORMATS:
        raise UserError(f"error: exam_format must be one of {', '.join(FORMATS)}, not {exam_format!r}")
    if suffix == ".json":
        rows = _json_items_by_line(path)
    elif suffix == ".jsonl":
        rows = read_jsonl(path)
    else:
        rows = read_rows(path)
    if not rows:
        raise DataError(path, None, "the file has no questions")
    layout = exam_format if exam_format != "auto" else detect_format(path, rows[0][1])
    unit = "row" if suffix == ".parquet" else "line"
    if layout == "cmmlu":
        columns = _table_columns(path, rows[0][1])
        return layout, [_from_table_row(path, line, row, columns, unit) for line, row in rows]
    if layout == "cmexam":  # CMExam leaves some questions without an answer; its own scripts skip them too
        answered = [(line, row) for line, row in rows if str(row.get("Answer") or "").strip()]
        if len(answered) < len(rows):
            print(f"note: {path}: {len(rows) - len(answered)} question(s) without an Answer skipped, as CMExam's "
                  "own scripts do")
        rows = answered or rows
    read = {"options": _from_options_row, "cmb": _from_cmb_row, "cmexam": _from_cmexam_row,
            "medqa": _from_medqa_row}[layout]
    return layout, [read(path, line, row) for line, row in rows]


def detect_format(path: Path, first: dict) -> str:
    """The layout of a file from its first row's columns."""
    names = {str(name).strip().lower() for name in first}
    if "answer_idx" in names:
        return "medqa"
    if "option" in names and "options" not in names:
        return "cmb"
    if "options" in names and path.suffix.lower() in (".csv", ".parquet"):
        return "cmexam"
    if "options" in names:
        return "options"
    if {"question", "a", "b", "answer"} <= names:
        return "cmmlu"
    raise DataError(path, 1, f"unknown exam layout (columns {', '.join(sorted(map(str, first)))}); expected "
                    "ours (question/options/answer), CMMLU/C-Eval (Question,A,B,C,D,Answer), CMB-Exam "
                    "(question/option/answer), CMExam (Question,Options,Answer) or MedQA "
                    "(question/options/answer/answer_idx); or name it with --exam_format")


def _json_items_by_line(path: Path) -> list[tuple[int, dict]]:
    """The objects of a JSON list, each with the line it starts on (CMB-Exam's files are indented JSON)."""
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return list(enumerate(data["data"], start=1))
    if not isinstance(data, list):
        raise DataError(path, None, "expected a JSON list of questions (or JSON Lines in a .jsonl file)")
    rows, at = [], text.index("[") + 1
    for item in data:
        at = re.compile(r"[\s,]*").match(text, at).end()
        _, end = decoder.raw_decode(text, at)
        line = text.count("\n", 0, at) + 1
        if not isinstance(item, dict):
            raise DataError(path, line, f"expected a JSON object, got {type(item).__name__}")
        rows.append((line, item))
        at = end
    return rows


def _from_options_row(path: Path, line: int, row: dict) -> dict:
    question, options, answer = row.get("question"), row.get("options"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise DataError(path, line, "'question' must be a non-empty string")
    return _checked_row(path, line, question, _option_texts(path, line, options, "options"), answer,
                        ident=row.get("id"), subject=row.get("subject"))


def _option_texts(path: Path, line: int, options, key: str) -> list:
    """The option texts A, B, ... of an {"A": ..., ...} object; a trailing empty option (CMB's "E": "") is none."""
    if not isinstance(options, dict) or not options:
        raise DataError(path, line, f"{key!r} must be an object such as {{\"A\": \"...\", \"B\": \"...\"}}")
    letters = sorted(k for k in options if not (k == sorted(options)[-1] and options[k] in ("", None)))
    if any(key not in LETTERS for key in letters):
        raise DataError(path, line, f"option names must be letters A-{LETTERS[-1]}, not {letters}")
    return [options.get(letter) for letter in LETTERS[: LETTERS.index(letters[-1]) + 1]]


def _from_cmb_row(path: Path, line: int, row: dict) -> dict:
    options = _option_texts(path, line, row.get("option"), "option")
    if not row.get("answer"):
        raise DataError(path, line, "no answer: CMB-Exam's test questions ship without them; the key is "
                        "data/CMB-test-choice-answer.json in github.com/FreedomIntelligence/CMB (join it by id), or "
                        "use CMB-val (CMB-Exam/CMB-val/CMB-val-merge.json)")
    return _checked_row(path, line, row.get("question"), options, row.get("answer"), ident=row.get("id"),
                        subject=row.get("exam_class") or row.get("exam_type"))


CMEXAM_SUBJECTS = ("Medical Discipline", "Clinical Department", "Disease Group", "Competency")


def _from_cmexam_row(path: Path, line: int, row: dict) -> dict:
    names = {str(name).strip().lower(): name for name in row}
    text = row.get(names.get("options", "Options"))
    if not isinstance(text, str) or not text.strip():
        raise DataError(path, line, "'Options' is empty (one \"A 文本\" per line)")
    options = {}
    for part in text.strip().splitlines():
        match = re.match(r"\s*([A-E])[\s.、:：)]+(.*)$", part)
        if match is None:
            raise DataError(path, line, f"an option line must start with its letter, as \"A 文本\", not {part!r}")
        options[match.group(1)] = match.group(2)
    subject = next((row.get(names[s.lower()]) for s in CMEXAM_SUBJECTS if row.get(names.get(s.lower(), ""))), "")
    return _checked_row(path, line, row.get(names.get("question", "Question")),
                        _option_texts(path, line, options, "Options"), row.get(names.get("answer", "Answer")),
                        subject=subject)


def _from_medqa_row(path: Path, line: int, row: dict) -> dict:
    options = _option_texts(path, line, row.get("options"), "options")
    checked = _checked_row(path, line, row.get("question"), options, row.get("answer_idx"),
                           subject=row.get("meta_info"))
    text = row.get("answer")
    if not isinstance(text, str) or text.strip() != checked["choices"][checked["label"]]:
        fail = [c for c in checked["choices"] if isinstance(text, str) and c == text.strip()]
        where = f"it is option {LETTERS[checked['choices'].index(fail[0])]}'s" if fail else "it matches no option"
        raise DataError(path, line, f"the answer text {text!r} is not option {checked['answer']}'s "
                        f"(answer_idx); {where}")
    return checked


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


def _checked_row(path: Path, line: int, question, options: list, answer, unit: str = "line", ident=None,
                 subject=None) -> dict:
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
    given = re.sub(r"[\s,、，]", "", answer.upper()) if isinstance(answer, str) else answer
    if not isinstance(given, str) or not given or any(ch not in letters for ch in given) or len(set(given)) < len(given):
        fail(f"the answer {answer!r} is not one of the options {', '.join(letters)}")
    given = "".join(sorted(given))
    row = {"question": question.strip(), "choices": texts, "answer": given, "label": letters.index(given[0]),
           "subject": str(subject).strip() if subject not in (None, "") else "", "line": line}
    return row | ({"id": str(ident)} if ident not in (None, "") else {})


def stratified_sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """n rows drawn without replacement, each subject keeping its share (largest remainders), in file order."""
    if n <= 0 or n >= len(rows):
        return rows
    by_subject: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_subject.setdefault(row.get("subject", ""), []).append(i)
    quotas = {s: n * len(idx) / len(rows) for s, idx in by_subject.items()}
    counts = {s: int(q) for s, q in quotas.items()}
    for s in sorted(quotas, key=lambda s: (counts[s] - quotas[s], s))[: n - sum(counts.values())]:
        counts[s] += 1
    rng = random.Random(seed)
    chosen = [i for s in sorted(by_subject) for i in rng.sample(by_subject[s], counts[s])]
    return [rows[i] for i in sorted(chosen)]


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

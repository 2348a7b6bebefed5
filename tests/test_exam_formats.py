"""The field's exam sets in their published layouts (CMB-Exam, CMExam, MedQA-MCMLE), read from data/exams/,
their bad files, the stratified sample, the bootstrap intervals and the lm-eval filter. No model loads here."""
import csv
import json
from pathlib import Path

import pytest

from medsft.errors import DataError
from medsft.exam_data import read_exam, stratified_sample
from medsft.exam_report import bootstrap_intervals

EXAMS = Path(__file__).resolve().parent.parent / "data" / "exams"


@pytest.mark.parametrize("name,layout,n,multi", [("cmb_exam_sample.json", "cmb", 12, 3),
                                                 ("cmexam_sample.csv", "cmexam", 10, 2),
                                                 ("medqa_mcmle_sample.jsonl", "medqa", 10, 0)])
def test_each_sample_is_read_in_its_layout(name, layout, n, multi):
    found, rows = read_exam(EXAMS / name)
    assert found == layout and len(rows) == n
    assert sum(len(row["answer"]) > 1 for row in rows) == multi
    assert all(row["subject"] for row in rows)  # every row keeps its subject for the breakdown
    assert read_exam(EXAMS / name, layout)[1] == rows  # named with --exam_format, the same rows


def test_rows_of_each_layout():
    _, cmb = read_exam(EXAMS / "cmb_exam_sample.json")
    multi = next(row for row in cmb if row["answer"] == "ABD")
    assert multi["choices"][2] == "C反应蛋白" and multi["subject"] == "执业医师"
    lines = (EXAMS / "cmb_exam_sample.json").read_text(encoding="utf-8").splitlines()
    assert lines[multi["line"] - 1].strip() == "{"  # the line its object starts on
    nursing = next(row for row in cmb if row["answer"] == "ABC" and len(row["choices"]) == 4)
    assert nursing["subject"] == "护士执业资格"  # CMB's empty "E": "" is no option
    _, cmexam = read_exam(EXAMS / "cmexam_sample.csv")
    assert cmexam[3] == {"question": "下列属于中医五脏的是", "choices": ["心", "肝", "胃", "肺", "胆"], "answer": "ABD",
                         "label": 0, "subject": "中医学", "line": 17}  # Options spans five lines of the CSV
    _, medqa = read_exam(EXAMS / "medqa_mcmle_sample.jsonl")
    assert medqa[0]["answer"] == "B" and medqa[0]["choices"][1] == "后穹窿穿刺" and medqa[0]["subject"] == "临床医学"


def _cmb(path, **change):
    good = {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "临床", "question": "问题",
            "answer": "A", "question_type": "单项选择题", "option": {"A": "甲", "B": "乙", "C": "丙"}}
    path.write_text(json.dumps([good, good | change], ensure_ascii=False, indent=2), encoding="utf-8")
    return path  # the second object starts on line 15


def _cmexam(path, options, answer):
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question", "Options", "Answer", "Explanation", "Medical Discipline"])
        writer.writerow(["好的问题", "A 甲\nB 乙", "A", "", "临床医学"])
        writer.writerow(["问题", options, answer, "", "临床医学"])
    return path


def _medqa(path, answer, idx, options=None):
    options = options or {"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": "戊"}
    rows = [{"question": "好的问题", "options": options, "answer": "甲", "meta_info": "x", "answer_idx": "A"},
            {"question": "问题", "options": options, "answer": answer, "meta_info": "x", "answer_idx": idx}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


BAD = [
    ("cmb-missing-option", lambda p: _cmb(p / "c.json", option={"A": "甲", "C": "丙"}), "line 15: option B is missing"),
    ("cmb-bad-letter", lambda p: _cmb(p / "c.json", answer="AD"),
     "line 15: the answer 'AD' is not one of the options A, B, C"),
    ("cmexam-missing-option", lambda p: _cmexam(p / "c.csv", "A 甲\nC 丙", "A"), "line 4: option B is missing"),
    ("cmexam-bad-letter", lambda p: _cmexam(p / "c.csv", "A 甲\nB 乙", "E"),
     "line 4: the answer 'E' is not one of the options A, B"),
    ("medqa-missing-option", lambda p: _medqa(p / "m.jsonl", "甲", "A", {"A": "甲", "B": "", "C": "丙"}),
     "line 1: option B is missing"),
    ("medqa-bad-letter", lambda p: _medqa(p / "m.jsonl", "甲", "F"),
     "line 2: the answer 'F' is not one of the options A, B, C, D, E"),
    ("medqa-text-matches-no-option", lambda p: _medqa(p / "m.jsonl", "己", "A"),
     "line 2: the answer text '己' is not option A's (answer_idx); it matches no option"),
    ("medqa-text-is-another-option", lambda p: _medqa(p / "m.jsonl", "丙", "A"),
     "line 2: the answer text '丙' is not option A's (answer_idx); it is option C's"),
]


@pytest.mark.parametrize("make,problem", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file_in_each_layout_is_one_line(tmp_path, make, problem):
    path = make(tmp_path)
    with pytest.raises(DataError) as excinfo:
        read_exam(path)
    message = str(excinfo.value)
    assert message == f"error: {path}: {problem}"


def test_stratified_sample_keeps_each_subjects_share():
    rows = [{"subject": s, "i": i} for i, s in enumerate("a" * 60 + "b" * 30 + "c" * 10)]
    drawn = stratified_sample(rows, 20, seed=1)
    assert [sum(r["subject"] == s for r in drawn) for s in "abc"] == [12, 6, 2]
    assert [r["i"] for r in drawn] == sorted(r["i"] for r in drawn)  # file order kept
    assert drawn == stratified_sample(rows, 20, seed=1) != stratified_sample(rows, 20, seed=2)
    assert stratified_sample(rows, 500, seed=1) == rows


def test_bootstrap_intervals_cover_the_accuracies():
    base, tuned = [1, 0] * 50, [1, 1, 1, 0] * 25  # 0.50 and 0.75
    ci = bootstrap_intervals(base, tuned, seed=0)
    assert ci["base"][0] < 0.5 < ci["base"][1] and ci["finetuned"][0] < 0.75 < ci["finetuned"][1]
    assert 0 < ci["delta"][0] < 0.25 < ci["delta"][1] < 0.5  # paired: narrower than the two intervals together
    assert ci == bootstrap_intervals(base, tuned, seed=0)


def test_lm_eval_filter_reads_with_the_answer_reader():
    import sys

    sys.path.insert(0, str(EXAMS.parent.parent / "eval_tasks"))
    try:
        from utils import read_letters
    finally:
        sys.path.pop(0)
    docs = [{"choices": ["甲", "乙", "丙", "丁", "戊"]}, {"choices": ["甲", "乙", "丙", "丁"], "thinking": False},
            {"choices": ["甲", "乙", "丙", "丁"]}]
    replies = [["<think>先看B超</think>首选B超检查。答案：A、C"], ["答案：D"], ["<think>维生素B12"]]
    assert read_letters(replies, docs) == [["AC"], ["D"], ["[invalid]"]]


def test_cmexam_questions_without_an_answer_are_skipped_and_counted(tmp_path, capsys):
    path = _cmexam(tmp_path / "c.csv", "A 甲\nB 乙", "")  # CMExam leaves some questions unanswered
    assert [row["question"] for row in read_exam(path)[1]] == ["好的问题"]
    assert f"note: {path}: 1 question(s) without an Answer skipped" in capsys.readouterr().out

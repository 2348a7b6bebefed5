"""GRPO's prompts: exam questions (the files benchmark.py reads), asked the way benchmark.py's generate mode asks
them, split into training and held-out questions, with the questions of the benchmark files left out.

A prompt is rendered by the chat format's owner (medsft/chat_format.py): the run's SYSTEM_PROMPT, thinking on,
and the question as plain text (control tokens typed inside a question stay text; TRL would tokenise the prompt
string and turn them into control tokens, so the trainer takes these ids instead: medsft/grpo.py).
"""
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from medsft.chat_format import encode_prompt, render_prompt
from medsft.exam_data import LETTERS, read_exam_file

# The instruction lines of benchmark.py's generate mode (eval_tasks/_exam_generate.yaml, doc_to_text): the same
# words, so that GRPO trains exactly the question the benchmark asks (tests/test_grpo.py holds them equal)
EXAM_INSTRUCTION = "以下是单项选择题，请选出正确答案，最后以“答案：X”的格式给出选项字母。"
MULTIPLE_ANSWER_INSTRUCTION = "以下是多项选择题，请选出所有正确答案，最后以“答案：XY”的格式给出选项字母。"


def answer_letters(row: dict) -> str:
    """The right letters of an exam row, sorted ("C", or "AB" for a multiple-answer question); a row with only a
    label gives its one letter."""
    answer = row.get("answer")
    if isinstance(answer, str) and answer.strip():
        return "".join(sorted(set(answer.strip().upper())))
    return LETTERS[row["label"]]


def exam_question_text(row: dict) -> str:
    """The user turn: the instruction (the multiple-answer one when the answer has several letters), a blank line,
    the question, then one "A. text" line per option."""
    instruction = MULTIPLE_ANSWER_INSTRUCTION if len(answer_letters(row)) > 1 else EXAM_INSTRUCTION
    options = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"]))
    return f"{instruction}\n\n{row['question']}{options}"


_IGNORED = re.compile(r"\s+")


def normalised_question(text: str) -> str:
    """The question for matching: NFKC (full-width forms become ASCII), whitespace and punctuation removed, lower case."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith(("P", "S")))
    return _IGNORED.sub("", text).lower()


@dataclass
class ExamPrompts:
    train_rows: list  # {"prompt": rendered text, "answer": right letters, "question": the exam question}
    val_rows: list
    prompt_ids: dict = field(default_factory=dict)  # rendered text -> token ids, the question as plain text
    dropped_as_benchmark: int = 0  # training questions that matched a benchmark file's
    files: list = field(default_factory=list)


def load_exam_prompts(cfg, tokenizer) -> ExamPrompts:
    """Every question of EXAM_FILE (several files allowed), minus the ones in BENCHMARK_FILE, shuffled with SEED;
    VAL_QUESTIONS of them (at most a fifth) held out for the greedy accuracy evaluation."""
    rows = [row for path in cfg.EXAM_FILE for row in read_exam_file(path)]
    benchmark = {normalised_question(row["question"]) for path in cfg.BENCHMARK_FILE for row in read_exam_file(path)}
    kept = [row for row in rows if normalised_question(row["question"]) not in benchmark]
    seen, unique = set(), []
    for row in kept:  # a question asked twice would sit in both halves
        key = normalised_question(row["question"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    random.Random(cfg.SEED).shuffle(unique)
    n_val = min(cfg.VAL_QUESTIONS, len(unique) // 5) if len(unique) >= 5 else 0
    prompts = ExamPrompts([], [], dropped_as_benchmark=len(rows) - len(kept), files=list(cfg.EXAM_FILE))
    for i, row in enumerate(unique):
        question = exam_question_text(row)
        text = render_prompt(tokenizer, question, cfg.SYSTEM_PROMPT, enable_thinking=True)
        prompts.prompt_ids[text] = encode_prompt(tokenizer, question, cfg.SYSTEM_PROMPT, enable_thinking=True)
        (prompts.val_rows if i < n_val else prompts.train_rows).append(
            {"prompt": text, "answer": answer_letters(row), "question": row["question"]})
    return prompts


def check_exam_prompts(prompts: ExamPrompts, cfg) -> None:
    from medsft.errors import UserError

    if not prompts.train_rows or not prompts.val_rows:
        raise UserError(f"error: exam_file {', '.join(map(str, cfg.EXAM_FILE))}: {len(prompts.train_rows)} training "
                        f"and {len(prompts.val_rows)} held-out questions after the benchmark's "
                        f"{prompts.dropped_as_benchmark} were dropped; GRPO needs at least 5 questions")


def show_exam_prompts(prompts: ExamPrompts, cfg) -> None:
    """The data line of the log, and one rendered prompt."""
    dropped = prompts.dropped_as_benchmark
    print(f"exam questions: {len(prompts.train_rows)} to train on, {len(prompts.val_rows)} held out "
          f"(greedy accuracy every eval_steps), from {', '.join(map(str, prompts.files))}"
          + (f"; {dropped} dropped as they are in benchmark_file {', '.join(map(str, cfg.BENCHMARK_FILE))}"
             if cfg.BENCHMARK_FILE else "; no benchmark_file given, so nothing was checked for contamination"),
          flush=True)
    first = prompts.train_rows[0]
    print(f"==== one rendered prompt (right answer {first['answer']}) ====\n{first['prompt']}\n====", flush=True)


def exam_files_problems(cfg) -> list[str]:
    problems = [] if cfg.EXAM_FILE else ["exam_file is empty: name the exam files to train on (.jsonl, or CMMLU/"
                                         "C-Eval .csv/.parquet), e.g. --exam_file=data/exam_sample.jsonl"]
    for name in ("EXAM_FILE", "BENCHMARK_FILE"):
        problems += [f"{name.lower()} {path}: no such file" for path in getattr(cfg, name) if not Path(path).is_file()]
    return problems

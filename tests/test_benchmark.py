"""benchmark.py: base against fine-tuned on exam questions through lm-eval, on the tiny model and its adapter."""
import csv
import json
import math
import re
from pathlib import Path

import pytest

import benchmark
from medsft.errors import DataError, UserError
from medsft.exam_data import read_exam_file
from medsft.exam_harness import group_subjects
from medsft.exam_report import mcnemar_exact_p

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EXAM = ROOT / "data" / "exam_sample.jsonl"
BASE_COLOUR, TUNED_COLOUR = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # exam_report.plot_report's bar colours


@pytest.fixture(scope="module", autouse=True)
def no_environment_dump():
    """simple_evaluate records torch's collect_env (it runs `pip list` and more in subprocesses, seconds a pass);
    benchmark.json does not keep it, so the tests skip it."""
    import lm_eval.evaluator

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        yield


def run_benchmark(out_dir, adapter, *args):
    out_dir.mkdir(parents=True, exist_ok=True)
    report = benchmark.main([f"--finetuned_path={adapter}", f"--report_path={out_dir / 'benchmark.json'}",
                             "--batch_size=8", *args])
    return report, json.loads((out_dir / "benchmark.json").read_text(encoding="utf-8"))


def table_rows(text: str, table: str = "By task:") -> list[list[str]]:
    """The rows of the printed markdown table under `table` (header and rule dropped), cells stripped."""
    text = text.split(table, 1)[1].split("\n\n", 1)[0].strip() if table in text else ""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def bar_runs(png_path, colour) -> int:
    """How many separate bars of `colour` cross the row just above the lowest bar pixel (the x axis)."""
    from PIL import Image

    image = Image.open(png_path).convert("RGB")
    width, height = image.size
    pixels = image.load()
    rows = [y for y in range(height) for x in range(0, width, 2) if pixels[x, y] == colour]
    if not rows:
        return 0
    y = max(rows) - 2
    runs, inside, gap = 0, False, 0
    for x in range(width):
        if pixels[x, y] == colour:
            runs += not inside
            inside, gap = True, 0
        elif inside:
            gap += 1
            inside = gap <= 3  # an error bar drawn over a bar does not split it
    return runs


@pytest.fixture(scope="module")
def loglikelihood_run(tmp_path_factory, trained_adapter):
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("bench-ll")
    printed = io.StringIO()
    with redirect_stdout(printed):
        report, saved = run_benchmark(out, trained_adapter, f"--exam_file={SAMPLE_EXAM}", "--mode=loglikelihood")
    return out, printed.getvalue(), saved


def check_outcomes(saved: dict, task: str, n: int) -> None:
    """Per-question outcomes add up to each model's accuracy, and McNemar's p is the one of these outcomes."""
    entry = saved["tasks"][task]
    assert entry["n"] == n
    for side in ("base", "finetuned"):
        outcomes = entry[side]["outcomes"]
        assert len(outcomes) == n
        if task != "medical_zh":
            assert sorted(o["doc_id"] for o in outcomes) == list(range(n))
        assert math.isclose(sum(o["correct"] for o in outcomes) / n, entry[side]["acc"])
        assert entry[side]["stderr"] is not None and entry[side]["stderr"] >= 0
    pairs = list(zip(entry["base"]["outcomes"], entry["finetuned"]["outcomes"]))
    b = sum(x["correct"] and not y["correct"] for x, y in pairs)
    c = sum(y["correct"] and not x["correct"] for x, y in pairs)
    hand = min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c))
    assert math.isclose(entry["mcnemar_p"], hand)
    assert math.isclose(entry["delta"], entry["finetuned"]["acc"] - entry["base"]["acc"])


def test_mcnemar_exact_p_by_hand():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(3, 3) == 1.0
    assert math.isclose(mcnemar_exact_p(0, 5), 2 / 32)            # 2 * (1/2)^5
    assert math.isclose(mcnemar_exact_p(6, 1), 2 * (1 + 7) / 128)  # 2 * (C(7,0) + C(7,1)) / 2^7
    assert math.isclose(mcnemar_exact_p(2, 10), 2 * (1 + 12 + 66) / 4096)


def test_loglikelihood_mode_base_and_adapter(loglikelihood_run, trained_adapter, tiny_model_dir):
    out, printed, saved = loglikelihood_run
    rows = table_rows(printed)
    assert [row[:3] for row in rows] == [["exam_sample", "base", "20"], ["", "fine-tuned", "20"]]
    assert rows[1][5].startswith(("+", "-")) and rows[1][6] != ""
    check_outcomes(saved, "exam_sample", 20)
    outcomes = saved["tasks"]["exam_sample"]["base"]["outcomes"]
    assert [(o["id"], o["line"]) for o in outcomes] == [(f"exam-{i:02d}", i) for i in range(1, 21)]
    # fairness, recorded: the base came from the adapter's settings.json; same precision, template, system prompt
    assert saved["base"] == str(tiny_model_dir) and saved["precision"] == "bfloat16"
    assert saved["system_prompt"] == json.loads((trained_adapter / "settings.json").read_text())["SYSTEM_PROMPT"]
    prompt = saved["chat_template"]["first_prompt"]
    assert prompt.startswith(f"<|im_start|>system\n{saved['system_prompt']}<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the letter is scored after the empty think
    assert "以下是单项选择题" in prompt and "\nA. " in prompt
    assert len(saved["chat_template"]["sha256"]) == 64 and "engine: transformers" in printed
    assert saved["libraries"]["lm_eval"] and saved["engine"] == "transformers"
    assert (out / "benchmark.md").read_text(encoding="utf-8").count("fine-tuned") >= 2


def test_png_has_both_bars(loglikelihood_run):
    out, _, saved = loglikelihood_run
    entry = saved["tasks"]["exam_sample"]
    assert entry["base"]["acc"] > 0 and entry["finetuned"]["acc"] > 0  # else a bar would have no height
    png = out / "benchmark.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert bar_runs(png, BASE_COLOUR) == 1 and bar_runs(png, TUNED_COLOUR) == 1


def test_generate_mode_base_and_adapter(tmp_path, trained_adapter, capsys):
    _, saved = run_benchmark(tmp_path, trained_adapter, f"--exam_file={SAMPLE_EXAM}", "--mode=generate",
                             "--max_new_tokens=4", "--temperature=0", "--limit=10")
    rows = table_rows(capsys.readouterr().out)
    assert [row[:3] for row in rows] == [["exam_sample", "base", "10"], ["", "fine-tuned", "10"]]
    assert len(rows[0]) == 9  # ... cut off, no letter
    check_outcomes(saved, "exam_sample", 10)
    for side in ("base", "finetuned"):
        for o in saved["tasks"]["exam_sample"][side]["outcomes"]:
            assert o["correct"] == (o["answer"] == o["target"])
            assert not (o["cut_off"] and o["correct"]) and not (o["no_letter"] and o["correct"])
    assert saved["chat_template"]["first_prompt"].endswith("<|im_start|>assistant\n")  # the model opens its think


def test_generate_mode_reads_the_letter_after_think(tmp_path, trained_adapter, monkeypatch, capsys):
    """Stub replies: the base thinks "A" and answers "B"; the adapter is cut off while thinking (and for one
    question answers without any letter). Only letters after </think> count."""
    import torch
    from lm_eval.models.huggingface import HFLM

    def stub_generate(self, context, max_length, stop, **kwargs):
        prompt = self.tokenizer.decode(context[0])
        if not hasattr(self.model, "peft_config"):
            reply = "<think>\n我认为答案是A。\n</think>\n\n答案：B"
        elif "夜盲" in prompt:
            reply = "<think>\n选A\n</think>\n\n我不确定。"
        else:
            reply = "<think>\n答案：A"
        ids = torch.tensor(self.tokenizer(reply, add_special_tokens=False)["input_ids"])
        return torch.cat([context, ids.repeat(context.shape[0], 1).to(context.device)], dim=1)

    monkeypatch.setattr(HFLM, "_model_generate", stub_generate)
    _, saved = run_benchmark(tmp_path, trained_adapter, f"--exam_file={SAMPLE_EXAM}", "--mode=generate",
                             "--max_new_tokens=64", "--batch_size=1")
    base = saved["tasks"]["exam_sample"]["base"]["outcomes"]
    tuned = saved["tasks"]["exam_sample"]["finetuned"]["outcomes"]
    assert {o["answer"] for o in base} == {"B"}
    assert [o["correct"] for o in base] == [int(o["target"] == "B") for o in base]
    assert sum(o["correct"] for o in base) == 5  # data/exam_sample.jsonl has five B answers
    assert sum(o["cut_off"] for o in tuned) == 19 and sum(o["no_letter"] for o in tuned) == 1
    assert all(o["answer"] is None and not o["correct"] for o in tuned)
    assert saved["tasks"]["exam_sample"]["finetuned"]["acc"] == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[0][7:] == ["0", "0"] and rows[1][7:] == ["19", "1"]


def write_csv(path: Path, header: list, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def official_exam_dir(root: Path) -> Path:
    """Every medical_zh subject in the official layouts: CMMLU test/<subject>.csv (with its unnamed index
    column), C-Eval val/<subject>_val.csv (id,question,A,B,C,D,answer,explanation); two questions each."""
    exam_dir = root / "exams"
    for task in group_subjects():
        rows = [(f"{task} 第{i}题：正确的是哪一个？", "甲", "乙", "丙", "丁", "ABCD"[i % 4]) for i in range(2)]
        if task.startswith("cmmlu_"):
            write_csv(exam_dir / "cmmlu" / "test" / f"{task.removeprefix('cmmlu_')}.csv",
                      ["", "Question", "A", "B", "C", "D", "Answer"], [(i, *row) for i, row in enumerate(rows)])
        else:
            subject = task.removeprefix("ceval-valid_")
            write_csv(exam_dir / "ceval-exam" / "val" / f"{subject}_val.csv",
                      ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                      [(i, *row, "") for i, row in enumerate(rows)])
    return exam_dir


def test_medical_zh_from_official_csv_files(tmp_path, trained_adapter, capsys):
    exam_dir = official_exam_dir(tmp_path)
    _, saved = run_benchmark(tmp_path / "out", trained_adapter, f"--exam_dir={exam_dir}", "--mode=loglikelihood")
    subjects = group_subjects()
    assert sorted(saved["tasks"]) == sorted(subjects + ["medical_zh"]) and list(saved["tasks"])[-1] == "medical_zh"
    for task in subjects:
        check_outcomes(saved, task, 2)
    check_outcomes(saved, "medical_zh", 2 * len(subjects))
    pooled = saved["tasks"]["medical_zh"]["base"]["outcomes"]
    assert sorted((o["task"], o["doc_id"]) for o in pooled) == sorted((t, i) for t in subjects for i in range(2))
    assert saved["tasks"]["cmmlu_anatomy"]["source"] == str(exam_dir / "cmmlu" / "test" / "anatomy.csv")
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 2 * (len(subjects) + 1) and rows[-2][:3] == ["medical_zh", "base", "22"]


def test_exam_file_in_cmmlu_csv_layout(tmp_path):
    path = tmp_path / "my_exam.csv"
    write_csv(path, ["", "Question", "A", "B", "C", "D", "Answer"], [(0, "问题一", "甲", "乙", "丙", "丁", "C"),
                                                                     (1, "问题二", 1, 2, 3, 4, " a ")])
    rows = read_exam_file(path)
    assert rows == [{"question": "问题一", "choices": ["甲", "乙", "丙", "丁"], "answer": "C", "label": 2, "subject": "",
                     "line": 2},
                    {"question": "问题二", "choices": ["1", "2", "3", "4"], "answer": "A", "label": 0, "subject": "",
                     "line": 3}]


BAD_FILES = [
    ("bad.jsonl", '{"question": "q", "options": {"A": "1", "B": "2"}, "answer": "A"}\n'
                  '{"question": "q", "options": {"A": "1", "B": "2", "D": "4"}, "answer": "A"}\n',
     "line 2: option C is missing"),
    ("bad.jsonl", '{"question": "q", "options": {"A": "1", "B": "2", "C": "3"}, "answer": "D"}\n',
     "line 1: the answer 'D' is not one of the options A, B, C"),
    ("bad.jsonl", '{"question": "q", "options": {"A": "1", "B": "2"}, "answer": "A"}\n{"question": "q",\n',
     "line 2: invalid JSON"),
    ("bad.csv", "Question,A,B,C,D,Answer\n问题,甲,乙,丙,丁,A\n问题,甲,,丙,丁,B\n", "line 3: option B is missing"),
]


@pytest.mark.parametrize("name,text,problem", BAD_FILES, ids=["missing-option", "bad-answer", "bad-json", "csv"])
def test_bad_exam_file_is_one_line_and_no_output(tmp_path, name, text, problem):
    adapter = tmp_path / "adapter"  # the exam file is checked before any model or adapter loads
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataError) as excinfo:
        run_benchmark(out, adapter, f"--exam_file={path}")
    message = str(excinfo.value)
    assert message.startswith(f"error: {path}: {problem}") and "\n" not in message
    assert list(out.iterdir()) == []


def test_medical_zh_without_files_says_where_to_get_them(tmp_path, trained_adapter):
    with pytest.raises(UserError, match="cmmlu_v1_0_1.zip.*ceval-exam.zip.*--exam_dir=exams.*--exam_file"):
        run_benchmark(tmp_path, trained_adapter)
    with pytest.raises(UserError, match=r"exam_dir .*: no file for 11 task\(s\): cmmlu/test/clinical_knowledge.csv"):
        run_benchmark(tmp_path, trained_adapter, f"--exam_dir={tmp_path}")


def test_adapter_that_trains_the_tied_embedding(tmp_path, tiny_model_dir):
    """v2/v3 adapters train Qwen3's tied embedding; lm-eval's wrapper calls tie_weights(), which fails on them
    ("attribute 'weight' already exists") unless skipped. PEFT has tied it already: the logits are the adapter's."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from medsft.exam_harness import hf_model
    from medsft.model_loading import load_base_model, load_tokenizer

    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True,
                        task_type="CAUSAL_LM")
    trained = get_peft_model(load_base_model(str(tiny_model_dir), False), config)
    with torch.no_grad():
        trained.base_model.model.model.embed_tokens.modules_to_save["default"].weight.mul_(3.0)
    trained.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = trained(input_ids=ids).logits
    model = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir), False), tmp_path / "adapter").eval()
    settings = SimpleNamespace(BATCH_SIZE=2, MAX_LENGTH=64, MAX_NEW_TOKENS=8, MODE="loglikelihood", THINKING=True)
    lm = hf_model(model, load_tokenizer(str(tiny_model_dir)), settings)
    assert lm.model is model and "tie_weights" not in vars(model)
    torch.testing.assert_close(lm.model(input_ids=ids).logits, expected)


def test_parquet_mirror_layout(tmp_path):
    """A hub mirror's parquet files are found by subject and split and read like the CSV files."""
    import pandas as pd

    from medsft.exam_data import find_subject_file

    cmmlu = tmp_path / "exams" / "cmmlu" / "anatomy" / "test" / "0000.parquet"
    ceval = tmp_path / "exams" / "ceval-exam" / "physician" / "val-00000-of-00001.parquet"
    for path in (cmmlu, ceval):
        path.parent.mkdir(parents=True)
    pd.DataFrame({"Question": ["问"], "A": ["1"], "B": ["2"], "C": ["3"], "D": ["4"], "Answer": ["D"]}).to_parquet(cmmlu)
    pd.DataFrame({"id": [7], "question": ["问"], "A": ["1"], "B": ["2"], "C": ["3"], "D": [""], "answer": ["B"],
                  "explanation": [""]}).to_parquet(ceval)
    assert find_subject_file(tmp_path / "exams", "cmmlu", "anatomy", "test") == cmmlu
    assert find_subject_file(tmp_path / "exams", "ceval", "physician", "val") == ceval
    assert find_subject_file(tmp_path / "exams", "cmmlu", "physician", "val") is None
    assert read_exam_file(cmmlu) == [{"question": "问", "choices": ["1", "2", "3", "4"], "answer": "D", "label": 3,
                                      "subject": "", "line": 1}]
    with pytest.raises(DataError, match=r"physician/val-00000-of-00001.parquet: row 1: option D is missing"):
        read_exam_file(ceval)


CMB_SAMPLE = ROOT / "data" / "exams" / "cmb_exam_sample.json"


@pytest.fixture(scope="module")
def stub_generate_run(tmp_path_factory, trained_adapter):
    """benchmark.py with no --mode and no --report_path on a copy of the run (OUTPUT_DIR/final), over the CMB-Exam
    sample, with stub replies full of letters that are not answers (B超, 维生素B12, C反应蛋白, "A选项错误"): the
    base answers every question right, the adapter gives only the first letter of a multiple-answer question."""
    import io
    import shutil
    from contextlib import redirect_stdout

    import torch
    from lm_eval.models.huggingface import HFLM

    from medsft.exam_data import read_exam_file

    answers = {row["question"]: row["answer"] for row in read_exam_file(CMB_SAMPLE)}

    def stub_generate(self, context, max_length, stop, **kwargs):
        prompt = self.tokenizer.decode(context[0])
        answer = next(a for q, a in answers.items() if q in prompt)
        if not hasattr(self.model, "peft_config"):
            reply = f"<think>\n先看B超和维生素B12。\n</think>\n\n首选B超检查，C反应蛋白不高。答案：{'、'.join(answer)}"
        else:
            reply = f"<think>\n答案是E吗？\n</think>\n\nA选项错误，B超无助诊断。\n\n先选E，最终答案：**{answer[0]}**"
        ids = torch.tensor(self.tokenizer(reply, add_special_tokens=False)["input_ids"])
        return torch.cat([context, ids.repeat(context.shape[0], 1).to(context.device)], dim=1)

    run = tmp_path_factory.mktemp("stub-run")
    shutil.copytree(trained_adapter, run / "final")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed):
        patch.setattr(HFLM, "_model_generate", stub_generate)
        benchmark.main([f"--finetuned_path={run / 'final'}", f"--exam_file={CMB_SAMPLE}", "--max_new_tokens=64",
                        "--batch_size=1"])
    return run, printed.getvalue()


def test_generate_mode_reads_answers_past_b_ultrasound_letters(stub_generate_run):
    run, printed = stub_generate_run
    saved = json.loads((run / "benchmark.json").read_text(encoding="utf-8"))
    task = saved["tasks"]["cmb_exam_sample"]
    assert [o["correct"] for o in task["base"]["outcomes"]] == [1] * 12
    assert [o["answer"] for o in task["base"]["outcomes"]][3] == "ABD"  # a multiple-answer question, read as a set
    tuned = task["finetuned"]["outcomes"]
    assert [o["correct"] for o in tuned] == [int(not o["multi"]) for o in tuned] and sum(o["multi"] for o in tuned) == 3
    exam = saved["exams"]["CMB-Exam"]
    assert exam["n"] == 12 and exam["base"]["acc"] == 1 and exam["finetuned"]["acc"] == 0.75
    assert exam["finetuned"]["single_acc"] == 1 and exam["finetuned"]["multi_acc"] == 0
    assert exam["base"]["unparsed"] == 0 and set(exam["base"]["by_subject"]) == {"执业医师", "护士执业资格", "执业药师", "考研"}
    lo, hi = exam["interval95"]["delta"]
    assert lo <= -0.25 <= hi <= 0 and exam["mcnemar_p"] == pytest.approx(0.25)  # b = 3, c = 0
    row = table_rows(printed, "By exam:")[0]
    assert row[:2] == ["CMB-Exam", "12"] and row[2].startswith("1.000 [") and row[4].startswith("-0.250 [")
    assert row[6:] == ["0.0%", "0.0%", "3 scored: 1.000 / 0.000"]  # multiple-answer accuracy kept apart
    markdown = (run / "benchmark.md").read_text(encoding="utf-8")
    assert "| CMB-Exam |" in markdown and "ANOTHER model's published results" in markdown and "2412.18925" in markdown


def test_default_mode_follows_no_think_fraction(stub_generate_run, tmp_path):
    run, printed = stub_generate_run
    saved = json.loads((run / "benchmark.json").read_text(encoding="utf-8"))
    assert saved["mode"] == "generate" and saved["no_think_fraction"] == 0 and saved["chat_template"]["enable_thinking"]
    assert saved["mode_reason"].startswith("the run trained with NO_THINK_FRACTION=0")
    assert re.search(r"\nmode += 'generate'  \(auto: the run trained with NO_THINK_FRACTION=0(\.0)?\)", printed)
    from medsft.settings import parse_settings

    for fraction, mode in ((0.25, "loglikelihood"), (0.0, "generate")):
        cfg = parse_settings(vars(benchmark), [])
        assert benchmark.choose_mode(cfg, {"NO_THINK_FRACTION": fraction}).startswith(
            f"the run trained with NO_THINK_FRACTION={fraction}") and cfg.MODE == mode
    cfg = parse_settings(vars(benchmark), ["--mode=loglikelihood"])
    assert benchmark.choose_mode(cfg, {"NO_THINK_FRACTION": 0.0}) == "given on the command line"
    assert cfg.MODE == "loglikelihood"


def test_report_is_written_beside_final(stub_generate_run):
    run, printed = stub_generate_run
    assert {p.name for p in run.iterdir()} >= {"final", "benchmark.json", "benchmark.md", "benchmark.png"}
    assert f"wrote {run / 'benchmark.json'}, {run / 'benchmark.md'} and {run / 'benchmark.png'}" in printed


def test_run_folder_gets_the_final_hint(trained_adapter):
    with pytest.raises(UserError, match=rf"neither an adapter .* nor a model folder .*; did you mean "
                                        rf"{trained_adapter.parent / 'final'}\?"):
        benchmark.main([f"--finetuned_path={trained_adapter.parent}", f"--exam_file={SAMPLE_EXAM}"])


def test_printed_settings_show_the_exam_files_tasks(tmp_path, trained_adapter, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "options": {"A": "1"}, "answer": "A"}\n', encoding="utf-8")
    with pytest.raises(DataError):  # stops after the settings are printed, before any model loads
        benchmark.main([f"--finetuned_path={trained_adapter}", f"--exam_file={SAMPLE_EXAM},{bad}",
                        f"--report_path={tmp_path / 'b.json'}"])
    printed = capsys.readouterr().out
    assert re.search(r"\ntasks += 'exam_sample,bad'  \(the exam_file tasks\)", printed)
    assert "medical_zh" not in printed

"""inference_lora.py and medsft.assistant on the tiny model: -q, batch files, the chat, scenarios and errors."""
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import inference_lora
from medsft.assistant import (SCENARIOS, MedicalAssistant, ThinkAnswerSplitter, history_turn, read_batch_file,
                              scenario_system_prompt)
from medsft.chat_format import SYSTEM_PROMPT, split_reply
from medsft.errors import DataError, UserError
from medsft.generation import Reply

ROOT = Path(__file__).resolve().parent.parent
IM_END, END_OF_TEXT = 151645, 151643


@pytest.fixture(scope="module")
def assistant(tiny_model_dir):
    """The bare tiny model; tests pass their sampling settings per call and leave `sampling` alone."""
    return MedicalAssistant(str(tiny_model_dir))


class ForceEndAfter:
    """A logits processor: no end token for the first k new tokens, then `end_id` for certain."""

    def __init__(self, k, end_id=IM_END):
        self.k, self.end_id, self.prompt_length = k, end_id, None

    def __call__(self, input_ids, scores):
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        scores = scores.clone()
        if input_ids.shape[1] - self.prompt_length >= self.k:
            scores[:] = -float("inf")
            scores[:, self.end_id] = 0.0
        else:
            scores[:, [IM_END, END_OF_TEXT]] = -float("inf")
        return scores


def force_end_after(k, end_id=IM_END):
    from transformers import LogitsProcessorList

    return LogitsProcessorList([ForceEndAfter(k, end_id)])


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def read_output(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------------------
# one question


def test_question_with_trained_adapter_prints_answer_and_finish_line(tiny_model_dir, trained_adapter, capsys):
    reply = inference_lora.main([f"--model_path={tiny_model_dir}", f"--adapter_path={trained_adapter}",
                                 "-q", "医生，我头痛怎么办？", "--max_new_tokens=16"])
    out = capsys.readouterr().out
    assert "问题 / question: 医生，我头痛怎么办？" in out
    assert "==== 回答 / answer ====" in out or "==== 思考 / thinking ====" in out
    finish = [line for line in out.splitlines() if line.startswith("[finish: ")]
    assert len(finish) == 1 and "tokens/s" in finish[0] and f"{reply.new_tokens} new tokens" in finish[0]
    assert reply.finish_reason in ("stop", "length") and 0 < reply.new_tokens <= 16
    assert "\033[" not in out  # plain text when stdout is not a terminal


def test_question_in_4bit_on_cpu(tiny_model_dir, trained_adapter, capsys):
    reply = inference_lora.main([f"--model_path={tiny_model_dir}", "-c", str(trained_adapter), "-q", "头痛怎么办？",
                                 "--max_new_tokens=4", "--load_in_4bit=True"])
    assert reply.new_tokens <= 4 and "[finish: " in capsys.readouterr().out


@pytest.mark.parametrize("end_id", [IM_END, END_OF_TEXT])
def test_generation_stops_at_the_end_token(assistant, end_id):
    reply = assistant.ask("头痛怎么办？", max_new_tokens=50, temperature=0, logits_processor=force_end_after(5, end_id))
    assert reply.finish_reason == "stop" and reply.new_tokens == 6
    assert "<|im_end|>" not in reply.text and "<|endoftext|>" not in reply.text


def test_streamed_reply_stops_at_the_end_token(assistant):
    pieces = list(assistant.stream("头痛怎么办？", max_new_tokens=50, temperature=0, logits_processor=force_end_after(5)))
    reply = assistant.last_reply
    assert reply.finish_reason == "stop" and reply.new_tokens == 6
    assert "".join(pieces).strip() == reply.text.strip()


def test_generation_without_end_token_finishes_with_length(assistant):
    reply = assistant.ask("头痛怎么办？", max_new_tokens=5, temperature=0, logits_processor=force_end_after(99))
    assert reply.finish_reason == "length" and reply.new_tokens == 5


def test_seed_makes_sampling_reproducible(assistant):
    first = assistant.ask("头痛怎么办？", max_new_tokens=8, temperature=1.0, seed=7)
    again = assistant.ask("头痛怎么办？", max_new_tokens=8, temperature=1.0, seed=7)
    assert first.text == again.text


def test_batch_of_questions_matches_single_answers_greedy(assistant):
    questions = ["头痛怎么办？", "儿童发热应该如何处理？这个问题比较长一些"]
    batch = assistant.ask_batch(questions, max_new_tokens=6, temperature=0)
    single = [assistant.ask(q, max_new_tokens=6, temperature=0) for q in questions]
    assert [r.text for r in batch] == [r.text for r in single]  # left padding changes nothing


# ---------------------------------------------------------------------------------------------------------
# the streamed display: think and answer apart


def test_splitter_finds_think_and_answer_whatever_the_pieces():
    text = "<think>\n用户问头痛。\n先想原因。\n</think>\n\n头痛可能与休息不足有关。<建议>多休息。"
    for size in (1, 2, 3, 5, 8, len(text)):
        splitter, parts = ThinkAnswerSplitter(), []
        for i in range(0, len(text), size):
            parts += splitter.feed(text[i : i + size])
        parts += splitter.close()
        think = "".join(t for s, t in parts if s == "think")
        answer = "".join(t for s, t in parts if s == "answer")
        assert (think, answer) == split_reply(text), size


def test_splitter_without_think_and_cut_inside_think():
    assert ThinkAnswerSplitter().feed("直接回答") == [("answer", "直接回答")]
    splitter = ThinkAnswerSplitter()
    parts = splitter.feed("<think>\n想到一半") + splitter.close()
    assert parts == [("think", "想到一半")]


class FakeAssistant:
    sampling = {"max_new_tokens": 30}

    thinking = True

    def __init__(self, pieces, reply):
        self.pieces, self.reply = pieces, reply

    def stream(self, question, scenario=None, history=()):
        yield from self.pieces
        self.last_reply = self.reply


def test_stream_answer_shows_thinking_then_answer(capsys):
    pieces = ["<think>", "\n想", "法\n", "</", "think>\n\n", "回答", "内容"]
    reply = Reply("".join(pieces), "想法", "回答内容", "length", 30)
    inference_lora.stream_answer(FakeAssistant(pieces, reply), "问")
    out = capsys.readouterr().out
    assert out == ("==== 思考 / thinking ====\n想法\n==== 回答 / answer ====\n回答内容\n"
                   "[finish: length (hit max_new_tokens=30; the reply is cut off) | 30 new tokens in "
                   + out.split(" new tokens in ")[1])


# ---------------------------------------------------------------------------------------------------------
# the chat


def test_chat_history_drops_earlier_thinks(assistant):
    done = Reply("<think>\n想法甲乙丙\n</think>\n\n回答一", "想法甲乙丙", "回答一", "stop", 12)
    cut = Reply("<think>\n想到一半丁戊", "想到一半丁戊", "", "length", 8)
    prompt = assistant.render("问题三", history=[history_turn("问题一", done), history_turn("问题二", cut)])
    assert "想法甲乙丙" not in prompt and "想到一半丁戊" not in prompt and "<think>" not in prompt
    assert "问题一" in prompt and "回答一" in prompt and "问题二" in prompt
    assert prompt.endswith("<|im_start|>user\n问题三<|im_end|>\n<|im_start|>assistant\n")


def test_chat_keeps_history_and_reset_clears_it(assistant, monkeypatch, capsys):
    prompts = []
    encode = assistant.encode
    monkeypatch.setattr(assistant, "encode", lambda q, s=None, h=(), t=None: prompts.append(
        assistant.tokenizer.decode(encode(q, s, h, t))) or encode(q, s, h, t))
    monkeypatch.setitem(assistant.sampling, "max_new_tokens", 4)
    lines = iter(["问题一", "问题二", "", "/reset", "问题三"])

    def read_line(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # Ctrl-D

    history = inference_lora.chat(assistant, read_line=read_line)
    assert "问题一" not in prompts[0].split("<|im_start|>user\n")[0]
    assert "问题一" in prompts[1] and "问题二" in prompts[1]
    assert "问题一" not in prompts[2] and "问题二" not in prompts[2] and "问题三" in prompts[2]
    assert [q for q, _ in history] == ["问题三"]
    assert "(history cleared)" in capsys.readouterr().out


def test_chat_exit_command(assistant):
    assert inference_lora.chat(assistant, read_line=lambda prompt: "/exit") == []


def test_chat_mode_needs_a_terminal(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(UserError, match="pass -q .* or -b"):
        inference_lora.main([f"--model_path={tiny_model_dir}", "--adapter_path="])


def test_chat_mode_on_a_terminal_ends_at_eof(monkeypatch, tiny_model_dir):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(""))
    monkeypatch.setattr("builtins.input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    assert inference_lora.main([f"--model_path={tiny_model_dir}", "--adapter_path="]) == []


# ---------------------------------------------------------------------------------------------------------
# scenarios


def test_scenario_appends_guidance_to_the_training_prompt(assistant):
    assert set(SCENARIOS) == {"diagnosis", "treatment", "prevention", "education", "emergency", "nutrition",
                              "mental_health", "pediatric", "geriatric", "women_health"}
    system = scenario_system_prompt("emergency")
    assert system == SYSTEM_PROMPT + "\n" + SCENARIOS["emergency"].guidance
    prompt = assistant.render("胸痛怎么办？", scenario="emergency")
    assert f"<|im_start|>system\n{SYSTEM_PROMPT}\n{SCENARIOS['emergency'].guidance}<|im_end|>" in prompt
    assert assistant.render("胸痛怎么办？").startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")


def test_list_scenarios(capsys):
    assert inference_lora.main(["--list_scenarios"]) is None
    out = capsys.readouterr().out
    for name, scenario in SCENARIOS.items():
        assert name in out and scenario.name_zh in out and scenario.example in out


def test_unknown_scenario_lists_the_valid_ones(tiny_model_dir):
    with pytest.raises(UserError, match="unknown scenario 'cardio'.*diagnosis, treatment"):
        inference_lora.main([f"--model_path={tiny_model_dir}", "--adapter_path=", "-q", "问", "-s", "cardio"])


# ---------------------------------------------------------------------------------------------------------
# batch files


def test_batch_writes_every_row_copies_fields_and_reruns_without_duplicates(tmp_path, tiny_model_dir,
                                                                           trained_adapter, capsys):
    questions = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "rt-1", "question": "胸口压榨样疼痛二十分钟了怎么办？", "expect": "emergency"},
        {"question": "孩子发烧39度怎么办？", "scenario": "pediatric"},
        "",
        {"id": 7, "question": "如何预防心血管疾病？", "think": "参考思考", "answer": "参考回答"},
    ])
    out = tmp_path / "out.jsonl"
    args = [f"--model_path={tiny_model_dir}", f"--adapter_path={trained_adapter}", "-b", str(questions),
            "-o", str(out), "--max_new_tokens=4", "--batch_size=2", "-s", "prevention"]
    result = inference_lora.main(args)
    assert result == {"output_file": str(out), "answered": 3, "skipped": 0}
    rows = read_output(out)
    assert [r["id"] for r in rows] == ["rt-1", "line-2", "7"]
    for row in rows:
        assert {"id", "question", "think", "answer", "output", "finish_reason", "new_tokens"} <= set(row)
        assert row["finish_reason"] in ("stop", "length") and 0 < row["new_tokens"] <= 4
        assert (row["think"], row["answer"]) == split_reply(row["output"])
    assert rows[0]["expect"] == "emergency" and rows[0]["scenario"] == "prevention"
    assert rows[1]["scenario"] == "pediatric"  # the row's scenario overrides -s
    assert rows[2]["input_think"] == "参考思考" and rows[2]["input_answer"] == "参考回答"
    assert json.loads((tmp_path / "out.settings.json").read_text())["ADAPTER_PATH"] == str(trained_adapter)

    assert inference_lora.main(args)["answered"] == 0
    assert len(read_output(out)) == 3
    assert "3 already answered" in capsys.readouterr().out


def test_batch_resumes_after_a_crash(tmp_path, tiny_model_dir):
    questions = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "question": f"问题{i}"} for i in range(3)])
    out = tmp_path / "in.pred.jsonl"  # the default output path
    done = {"id": "q0", "question": "问题0", "think": "", "answer": "done before the crash", "output": "x",
            "finish_reason": "stop", "new_tokens": 1}
    out.write_text(json.dumps(done, ensure_ascii=False) + "\n" + '{"id": "q1", "quest', encoding="utf-8")
    result = inference_lora.main([f"--model_path={tiny_model_dir}", "--adapter_path=", "-b", str(questions),
                                  "--max_new_tokens=3"])
    assert result["answered"] == 2 and result["skipped"] == 1
    rows = read_output(out)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"]
    assert rows[0]["answer"] == "done before the crash"


@pytest.mark.parametrize("lines, message", [
    (['{"id": 1, "question": "问"}', '{"id": 2, "question": '], r"in\.jsonl: line 2: invalid JSON"),
    (['{"id": 1, "question": "问'], r"line 1: invalid JSON \(Unterminated string starting at column \d+\)"),
    (['{"question": "问"}', '{"id": "b", "question": "  "}'], r"line 2: the question is missing or empty"),
    (['{"id": "b", "question": "问"}', '{"id": "x"}'], r"line 2: the question is missing or empty"),
    (['{"id": "a", "question": "问"}', '', '{"id": "a", "question": "再问"}'],
     r"line 3: duplicate id 'a' \(first on line 1\)"),
    (['{"question": "问", "scenario": "cardio"}'], r"line 1: unknown scenario 'cardio'; valid scenarios: diagnosis"),
])
def test_bad_batch_file_names_the_line(tmp_path, tiny_model_dir, lines, message):
    questions = write_jsonl(tmp_path / "in.jsonl", lines)
    with pytest.raises(DataError, match=message):
        inference_lora.main([f"--model_path={tiny_model_dir}", "--adapter_path=", "-b", str(questions)])


def test_batch_row_scenario_overrides_the_command_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"question": "问"}, {"question": "问", "scenario": "geriatric"}])
    assert [item.scenario for item in read_batch_file(path, "diagnosis")] == ["diagnosis", "geriatric"]
    assert [item.id for item in read_batch_file(path)] == ["line-1", "line-2"]


def test_batch_row_system_prompt_is_the_prompt_it_is_asked_with(tmp_path, assistant):
    from medsft.chat_format import encode_prompt

    path = write_jsonl(tmp_path / "in.jsonl", [{"question": "问"}, {"question": "问", "system_prompt": "你是儿科医生。"}])
    items = read_batch_file(path)
    assert [item.system_prompt for item in items] == [None, "你是儿科医生。"]
    assert assistant.encode("问", system_prompt="你是儿科医生。") == encode_prompt(assistant.tokenizer, "问", "你是儿科医生。")
    assert assistant.encode("问") == encode_prompt(assistant.tokenizer, "问", assistant.system_prompt)


# ---------------------------------------------------------------------------------------------------------
# errors: one clear line, no traceback


def test_missing_adapter_path(tiny_model_dir):
    with pytest.raises(UserError) as e:
        inference_lora.main([f"--model_path={tiny_model_dir}", "--adapter_path=/nonexistent/final", "-q", "问"])
    assert "/nonexistent/final" in str(e.value) and "\n" not in str(e.value)


def test_folder_without_adapter_suggests_final(tmp_path, tiny_model_dir):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"not a LoRA adapter; did you mean .*run/final"):
        inference_lora.main([f"--model_path={tiny_model_dir}", f"--adapter_path={tmp_path / 'run'}", "-q", "问"])


@pytest.fixture(scope="module")
def adapter_for_other_base(tmp_path_factory):
    """A LoRA adapter (untrained) for a tiny Qwen3 of hidden size 32; the test base has 64."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medsft.tiny_model import build_tiny_qwen3

    base = build_tiny_qwen3(tmp_path_factory.mktemp("tiny-hidden32"), hidden=32)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    out = tmp_path_factory.mktemp("adapter-hidden32")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(out)
    return base, out


def test_adapter_for_another_base_model(tiny_model_dir, adapter_for_other_base):
    other_base, adapter = adapter_for_other_base
    with pytest.raises(UserError) as e:
        inference_lora.main([f"--model_path={tiny_model_dir}", f"--adapter_path={adapter}", "-q", "问"])
    message = str(e.value)
    assert "does not match the base model" in message and str(adapter) in message and str(tiny_model_dir) in message
    assert str(other_base) in message and "size mismatch" in message


def test_an_explicit_base_of_another_shape_than_the_runs_is_refused_in_one_line_before_loading(
        tiny_model_dir, adapter_for_other_base, sample_data_dir, tmp_path, monkeypatch, capsys):
    import shutil

    import evaluate
    import merge_lora
    import web_demo

    other_base, adapter = adapter_for_other_base
    run_adapter = shutil.copytree(adapter, tmp_path / "run" / "final")
    (run_adapter / "settings.json").write_text(json.dumps({"MODEL_PATH": str(other_base)}))
    loads = []
    monkeypatch.setattr("medsft.model_loading.load_base_model", lambda *a, **k: loads.append(a))
    given = [f"--model_path={tiny_model_dir}", f"--adapter_path={run_adapter}"]
    for script, argv in ((inference_lora, [*given, "-q", "问"]),
                         (evaluate, [*given, f"--data_dir={sample_data_dir}", f"--report_path={tmp_path / 'r.json'}"]),
                         (web_demo, given), (merge_lora, [*given, f"--output_dir={tmp_path / 'merged'}"])):
        with pytest.raises(UserError) as e:
            script.main(argv)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"error: --model_path {tiny_model_dir} (hidden size 64, "), \
            message
        assert f"is not the shape of {other_base} (hidden size 32, layers 2), the base the adapter in {run_adapter} " \
               "was trained on" in message
    assert loads == [] and not (tmp_path / "merged").exists()
    monkeypatch.undo()

    # without --model_path, the run's base is the one loaded
    reply = inference_lora.main([f"--adapter_path={run_adapter}", "-q", "问", "--max_new_tokens=2"])
    out = capsys.readouterr().out
    assert f"loaded {other_base} + adapter {run_adapter}" in out and reply.new_tokens <= 2
    assert re.search(rf"^model_path += '{other_base}'  \(from the run\)$", out, re.M)


def test_attach_adapter_for_another_base_model(tiny_model_dir, adapter_for_other_base):
    """attach_adapter is what evaluate.py uses on a model it loaded itself."""
    from transformers import AutoModelForCausalLM

    from medsft.assistant import attach_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(UserError, match="does not match the base model tiny"):
        attach_adapter(model, adapter_for_other_base[1], "tiny")


@pytest.mark.parametrize("args", [["-q", "   "], ["-q", ""], ["--question="]])
def test_empty_question(tiny_model_dir, args):
    with pytest.raises(UserError, match="the question is empty"):
        inference_lora.main([f"--model_path={tiny_model_dir}", "--adapter_path=", *args])


def test_empty_question_through_the_api(assistant):
    with pytest.raises(UserError, match="the question is empty"):
        assistant.ask(" ")
    with pytest.raises(UserError, match="the question is empty"):
        assistant.ask_batch(["问", ""])


def test_question_and_batch_together(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="not both"):
        inference_lora.main([f"--model_path={tiny_model_dir}", "-q", "问", "-b", str(tmp_path / "x.jsonl")])


def test_several_bad_settings_reported_together():
    with pytest.raises(UserError) as e:
        inference_lora.main(["-q", "问", "--top_p=0", "--batch_size=0", "--temperature=-1"])
    assert all(s in str(e.value) for s in ("top_p", "batch_size", "temperature"))


def test_script_with_missing_adapter_exits_with_one_line(tiny_model_dir):
    run = subprocess.run([sys.executable, str(ROOT / "inference_lora.py"), "--adapter_path=/nonexistent",
                          f"--model_path={tiny_model_dir}", "-q", "医生，我头痛怎么办？"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "/nonexistent" in run.stderr

"""train_grpo.py: the rewards on written completions (anti-gaming included), the exam prompts and the
contamination guard, a real 2-step run from an SFT adapter (outputs, a changed adapter, resume), the learning
test on a toy reward the tiny model can learn, and the scripts that load the result with no other flag."""
import contextlib
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest

from medsft import rewards
from medsft.rewards import correct_reward, format_reward, language_reward, make_think_budget_reward
from tests.conftest import gpu

ROOT = Path(__file__).resolve().parent.parent
EXAMS = ROOT / "data" / "exam_sample.jsonl"
# 2 generations of 16 tokens, 2 steps: seconds on the tiny model
FAST_GRPO = ["--max_steps=2", "--num_generations=2", "--max_completion_length=16", "--think_budget=8",
             "--batch_size=2", "--gradient_accumulation=1", "--eval_steps=1", "--save_steps=1", "--eval_batch_size=8",
             "--report_to=none", "--progress_bar=False", "--sample_max_new_tokens=4", "--learning_rate=1e-2",
             "--mask_truncated_completions=False", "--warmup_ratio=0"]  # 16 tokens cut every reply: masked, nothing would be trained


def think(text="先分析病史和检查结果。", answer="答案：B"):
    return f"<think>\n{text}\n</think>\n\n{answer}"


END = rewards.END_OF_REPLY_IDS[0]


# ---------------------------------------------------------------------------------------------------------
# rewards


def test_correct_reward_reads_the_answer_after_the_think_and_resists_gaming():
    completions = [think(answer="答案：B"), think(answer="答案：C"), think(answer="答案：ABCDE"),
                   think(text="答案：B", answer="我不确定。"), "<think>\n答案：B", think(answer="综上，答案：A、C")]
    answers = ["B", "B", "B", "B", "B", "AC"]
    assert correct_reward(completions, answer=answers) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # every letter scores 0 on a single-answer question; an answer only in the think scores 0; a multiple-answer
    # question needs the exact set
    assert correct_reward([think(answer="答案：A")], answer=["AC"]) == [0.0]
    # a reply cut off at the length limit scores 0 even when its letter is right
    cut, whole = [5, 6, 7], [5, 6, END]
    assert correct_reward([think(), think()], answer=["B", "B"], completion_ids=[cut, whole]) == [0.0, 1.0]
    logged = {}
    correct_reward([think(), "<think>\n想", think(answer="不知道")], answer=["B"] * 3,
                   log_metric=lambda name, value: logged.update({name: value}))
    assert logged["unparsed"] == pytest.approx(2 / 3)


def test_format_reward_wants_one_non_empty_think_then_a_stated_answer():
    assert format_reward([
        think(),                                    # the native shape
        "  " + think(answer="所以答案是 C。"),        # leading space, another statement form
        think(text=""),                             # empty think
        think(answer="我选B"),                       # no answer statement
        "答案：B",                                   # no think
        think() + "\n<think>\n再想\n</think>\n答案：B",  # two thinks
        "<think>\n想\n</think>\n\n<answer>B</answer>",  # the <answer> tags of other recipes
    ]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_language_reward_is_the_chinese_share_of_the_answer():
    scores = language_reward([think(answer="答案：B"), think(answer="The answer is B"),
                              think(answer="选B，因为 ACEI 类药物"), "<think>\n想"])
    assert scores[0] == 1.0 and scores[1] == 0.0 and scores[3] == 0.0
    assert 0.5 < scores[2] < 1.0  # "ACEI" counts against it, the lone B does not


def test_think_budget_reward_is_flat_up_to_the_budget_then_linear():
    reward = make_think_budget_reward(budget=4, max_completion_length=8)
    assert reward.__name__ == "think_budget_reward"
    close = rewards.THINK_END_ID
    ids = [[1, 2, close, 9, END], [1] * 4 + [close, END], [1] * 6 + [close, END], [1] * 8]
    assert reward([""] * 4, completion_ids=ids) == [1.0, 1.0, 0.5, 0.0]


def test_a_right_answer_outscores_any_wrong_one_and_the_token_ids_are_qwen3s(tokenizer):
    assert rewards.FORMAT_WEIGHT + rewards.LANGUAGE_WEIGHT + rewards.THINK_BUDGET_WEIGHT < rewards.CORRECT_WEIGHT
    assert rewards.THINK_END_ID == tokenizer.convert_tokens_to_ids("</think>")
    assert set(rewards.END_OF_REPLY_IDS) == {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}


# ---------------------------------------------------------------------------------------------------------
# prompts and the contamination guard


def test_the_instructions_are_benchmark_generate_modes():
    from medsft.grpo_data import EXAM_INSTRUCTION, MULTIPLE_ANSWER_INSTRUCTION, exam_question_text

    template = (ROOT / "eval_tasks" / "_exam_generate.yaml").read_text(encoding="utf-8")
    line = next(line for line in template.splitlines() if line.startswith("doc_to_text:"))
    assert f"{{% if answer | length > 1 %}}{MULTIPLE_ANSWER_INSTRUCTION}{{% else %}}{EXAM_INSTRUCTION}{{% endif %}}" \
        "\\n\\n{{question}}" in line
    row = {"question": "问题", "choices": ["甲", "乙", "丙"], "answer": "AC", "label": 0}
    assert exam_question_text(row) == f"{MULTIPLE_ANSWER_INSTRUCTION}\n\n问题\nA. 甲\nB. 乙\nC. 丙"
    assert exam_question_text(dict(row, answer="B")).startswith(EXAM_INSTRUCTION + "\n\n")


def exam_cfg(tmp_path, **changes):
    from medsft import chat_format
    from medsft.settings import Settings

    return Settings(**{"EXAM_FILE": [str(EXAMS)], "BENCHMARK_FILE": [], "VAL_QUESTIONS": 64, "SEED": 42,
                       "SYSTEM_PROMPT": chat_format.SYSTEM_PROMPT, **changes})


def test_the_contamination_guard_drops_a_planted_duplicate_and_control_text_stays_text(tmp_path, tokenizer):
    from medsft.grpo_data import load_exam_prompts

    rows = [json.loads(line) for line in EXAMS.read_text(encoding="utf-8").splitlines()]
    planted = dict(rows[3], question=" " + rows[3]["question"].replace("？", "?") + "  ")  # other spaces, punctuation
    benchmark = tmp_path / "test.jsonl"
    benchmark.write_text(json.dumps(planted, ensure_ascii=False) + "\n", encoding="utf-8")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps(dict(rows[0], question="输入<|im_end|>会怎样？"), ensure_ascii=False) + "\n",
                   encoding="utf-8")
    prompts = load_exam_prompts(exam_cfg(tmp_path, EXAM_FILE=[str(EXAMS), str(odd)],
                                         BENCHMARK_FILE=[str(benchmark)]), tokenizer)
    questions = [r["question"] for r in prompts.train_rows + prompts.val_rows]
    assert prompts.dropped_as_benchmark == 1 and rows[3]["question"] not in questions
    assert len(questions) == len(rows) and len(prompts.val_rows) == len(rows) // 5
    odd_prompt = next(r["prompt"] for r in prompts.train_rows + prompts.val_rows if "<|im_end|>会" in r["prompt"])
    ids = prompts.prompt_ids[odd_prompt]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(end) == 2  # the system and user turns' own; the typed one is text
    assert tokenizer.decode(ids) == odd_prompt


# ---------------------------------------------------------------------------------------------------------
# a real run


def first_token_reward(completion_ids, **kwargs):
    """The first token's id / 151,936: a random model's replies all score 0 on the real rewards (no spread, so
    no advantage and no update); this spreads them, so the run's update is real."""
    return [ids[0] / 151936 if ids else 0.0 for ids in completion_ids]


def grpo_rewards():
    from medsft.rewards import reward_functions

    return reward_functions(8, 16)[0] + [first_token_reward]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, train_once, short_data_dir):
    """A 2-step train_grpo.py run continuing the session's v3 adapter, a checkpoint and an evaluation every step."""
    import train_grpo

    sft_out = train_once("v3", short_data_dir)[0]
    out, printed = tmp_path_factory.mktemp("grpo-run"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train_grpo.main([f"--sft_adapter={sft_out / 'final'}", f"--exam_file={EXAMS}",
                                  f"--output_dir={out}", *FAST_GRPO], reward_funcs=grpo_rewards())
    return out, result, printed.getvalue(), sft_out


def test_a_grpo_run_writes_its_outputs_and_changes_the_adapter(grpo_run):
    from safetensors.torch import load_file

    out, result, printed, sft_out = grpo_run
    for name in ("final/adapter_model.safetensors", "final/settings.json", "best/adapter_model.safetensors",
                 "metrics.jsonl", "reward.png", "summary.json", "settings.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train_records = [r for r in records if "reward" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    for key in ("rewards/correct_reward/mean", "rewards/correct_reward/std", "rewards/format_reward/mean",
                "rewards/language_reward/mean", "rewards/think_budget_reward/mean", "completions/mean_length",
                "completions/clipped_ratio", "unparsed", "accuracy"):
        assert all(key in r for r in train_records), key
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    assert "reward" in printed and "format" in printed and "think budget" in printed  # the reward parts, as it goes
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 2 and summary["best_step"] in (1, 2) and summary["dropped_as_benchmark"] == 0
    # each step timed: generating the completions, then the update; the step's time holds both
    step_s = [r["time/step_s"] for r in train_records]
    generation_s = [r["time/generation_s"] for r in train_records]
    assert all(0 < g < s for g, s in zip(generation_s, step_s))
    assert summary["seconds_per_step"] == round(statistics.median(step_s), 2)
    assert summary["generation_share"] == round(sum(generation_s) / sum(step_s), 3)
    assert "step s" in printed and "generating s" in printed
    settings = json.loads((out / "settings.json").read_text(encoding="utf-8"))
    sft_settings = json.loads((sft_out / "settings.json").read_text(encoding="utf-8"))
    assert settings["MODEL_PATH"] == sft_settings["MODEL_PATH"] and settings["SYSTEM_PROMPT"] == sft_settings["SYSTEM_PROMPT"]
    assert [stage["stage"] for stage in settings["CHAIN"]] == ["base", "sft", "grpo"]
    assert settings["CHAIN"][1]["path"] == str(sft_out / "final")
    before, after = load_file(sft_out / "final" / "adapter_model.safetensors"), load_file(
        out / "final" / "adapter_model.safetensors")
    assert before.keys() == after.keys()  # the same adapter, continued
    assert any(not (before[k].float() == after[k].float()).all() for k in before)


@gpu
def test_a_grpo_run_on_cuda_records_its_step_times_and_peak_memory(tiny_model_dir, tmp_path):
    """On CUDA, summary.json holds what the GPU check compares with the estimate: torch's reserved peak and the
    device-wide use (the paged 8-bit states and the CUDA context besides), and the timed steps."""
    import train_grpo

    train_grpo.main([f"--model_path={tiny_model_dir}", "--sft_adapter=", f"--exam_file={EXAMS}",
                     f"--output_dir={tmp_path}", *FAST_GRPO], reward_funcs=grpo_rewards())
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["device"] != "cpu" and summary["peak_gpu_reserved_gib"] > 0
    assert summary["peak_gpu_device_used_gib"] > summary["peak_gpu_reserved_gib"]
    assert summary["seconds_per_step"] > 0 and 0 < summary["generation_share"] < 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["gpu_device_used_gib"] > 0 for r in records if "reward" in r)


def test_a_stopped_grpo_run_resumes(grpo_run, tmp_path):
    import train_grpo

    out = tmp_path / "run"
    shutil.copytree(grpo_run[0], out)
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoint-2")  # as if killed after step 1's checkpoint
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train_grpo.main([f"--sft_adapter={grpo_run[3] / 'final'}", f"--exam_file={EXAMS}", f"--output_dir={out}",
                         *FAST_GRPO], reward_funcs=grpo_rewards())
    assert "resuming from" in printed.getvalue() and "checkpoint-1" in printed.getvalue()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if "reward" in r] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_inference_and_benchmark_take_the_grpo_result_with_no_other_flag(grpo_run, tmp_path):
    import benchmark
    import inference_lora

    final = grpo_run[0] / "final"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        inference_lora.main([f"--adapter_path={final}", "--question=头痛怎么办？", "--max_new_tokens=4"])
    assert f"+ adapter {final}" in printed.getvalue()
    report = tmp_path / "benchmark.json"
    with contextlib.redirect_stdout(io.StringIO()):
        benchmark.main([f"--finetuned_path={final}", f"--exam_file={EXAMS}", "--limit=1", "--max_new_tokens=4",
                        f"--report_path={report}"])
    assert report.is_file()


# ---------------------------------------------------------------------------------------------------------
# the gradient's sign: a toy reward the tiny model can learn


def toy_exam(folder: Path) -> Path:
    """Six questions that differ by one digit: the tiny model answers each with nearly the same first tokens."""
    rows = [{"question": f"第{i}题：头痛应该怎么办？", "options": {"A": "休息", "B": "就医"}, "answer": "A"} for i in range(6)]
    path = folder / "toy.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


TOY_SYSTEM_PROMPT = "你是医生。"  # a short prompt: on CPU TRL's log-probs score every prompt position too


def second_choice_first_token(model_dir, exam) -> tuple[int, float]:
    """The tiny model's second likeliest first token of a reply, and its probability when top_k=2 samples from
    the two likeliest (about a half)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft.chat_format import encode_prompt
    from medsft.exam_data import read_exam_file
    from medsft.grpo_data import exam_question_text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = encode_prompt(tokenizer, exam_question_text(read_exam_file(exam)[0]), TOY_SYSTEM_PROMPT)
    with torch.no_grad():
        top = model(torch.tensor([ids])).logits[0, -1].topk(2)
    return int(top.indices[1]), float(torch.softmax(top.values, 0)[1])


def test_grpo_raises_a_learnable_toy_reward_well_beyond_its_noise(tiny_model_dir, tmp_path):
    """With top_k=2 the first token of a reply is one of two; the reward is 1 when it is the one the untrained
    model finds less likely, sampled with probability p0 (about a half). A loop that learns moves the share of
    rewarded replies towards 1; the noise of a mean over n replies is sqrt(p0 (1 - p0) / n)."""
    import train_grpo

    exam = toy_exam(tmp_path)
    target, p0 = second_choice_first_token(tiny_model_dir, exam)

    def toy_reward(completions, completion_ids, **kwargs):
        return [float(bool(ids) and ids[0] == target) for ids in completion_ids]

    out = tmp_path / "toy"
    with contextlib.redirect_stdout(io.StringIO()):
        train_grpo.main([f"--model_path={tiny_model_dir}", "--sft_adapter=", f"--exam_file={exam}",
                         f"--system_prompt={TOY_SYSTEM_PROMPT}", f"--output_dir={out}", "--load_in_4bit=False",
                         "--num_generations=16", "--batch_size=16", "--gradient_accumulation=1",
                         "--max_completion_length=1", "--think_budget=0", "--top_k=2", "--lora_r=8", "--max_steps=10",
                         "--eval_steps=100", "--save_steps=100", "--learning_rate=0.02", "--warmup_ratio=0",
                         "--max_grad_norm=1.0", "--optim=adamw_torch", "--mask_truncated_completions=False",
                         "--gradient_checkpointing=False", "--report_to=none", "--progress_bar=False",
                         "--sample_max_new_tokens=1"], reward_funcs=[toy_reward])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    rewards_per_step = [r["reward"] for r in records if "reward" in r]
    assert len(rewards_per_step) == 10 and 0.2 < p0 < 0.8
    late = sum(rewards_per_step[-4:]) / 4  # 64 replies
    noise = (p0 * (1 - p0) / 64) ** 0.5
    assert late - p0 > 4 * noise, (p0, rewards_per_step)


# ---------------------------------------------------------------------------------------------------------
# the dry run


def test_the_dry_run_prints_a_prompt_the_rewards_and_an_estimate_that_fits_16_gb_at_1_7b(tmp_path, capsys):
    """Qwen3-1.7B at the defaults, from its config.json alone (no weights): the estimate fits a 16 GB card."""
    import train_grpo
    from test_memory_estimate import QWEN3_1_7B

    from medsft.memory_estimate import CUDA_CONTEXT_BYTES
    from medsft.tiny_model import qwen3_tokenizer_dir

    folder = tmp_path / "qwen3-1.7b"
    folder.mkdir()
    for file in qwen3_tokenizer_dir().iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    (folder / "config.json").write_text(json.dumps(QWEN3_1_7B))
    result = train_grpo.main([f"--model_path={folder}", "--sft_adapter=", f"--output_dir={tmp_path / 'out'}",
                              "--dry_run=True"])
    printed = capsys.readouterr().out
    assert "以下是单项选择题" in printed and "correct_reward 1.00" in printed and "estimated peak" in printed
    assert result["rewards"] == {"correct_reward": 1.0, "format_reward": 1.0, "language_reward": 1.0,
                                 "think_budget_reward": 1.0}
    estimate = result["estimate"]
    # the KV cache of 2 questions x 8 generations, each prompt + 1,024 tokens: 28 layers x 8 KV heads x 128 x 2 x 2 bytes
    assert estimate["phases"]["generation"] >= 16 * estimate["sequence"] * 28 * 8 * 128 * 2 * 2
    assert estimate["peak"] < 16e9
    # twice, as for SFT: torch-visible (the paged 8-bit states of LoRA's larger matrices and the CUDA context are
    # outside torch's counters) and the device total
    assert 0 < estimate["paged"] < estimate["static"]["optimizer"] and estimate["cuda_context"] == CUDA_CONTEXT_BYTES
    assert estimate["torch_visible_peak"] == estimate["peak"] - estimate["paged"] - estimate["cuda_context"]
    assert f"torch-visible {estimate['torch_visible_peak'] / 1e9:.2f} GB, device total {estimate['peak'] / 1e9:.2f} GB" \
        in printed
    assert not (tmp_path / "out").exists()

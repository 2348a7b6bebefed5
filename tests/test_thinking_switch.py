"""Qwen3's thinking switch: prompts without thinking, training examples without reasoning, and the loss split."""
import json

import pytest

import inference_lora
import train_lora3
from medsft.chat_format import (IGNORE_INDEX, SYSTEM_PROMPT, build_messages, build_training_example, encode_prompt,
                                format_reply, thinking_switch, turn_thinks)
from medsft.errors import UserError
from medsft.generation import Reply
from medsft.no_think import NoThinkMix, drawn_indices, mix_val_examples, reply_start, without_reasoning
from tests.conftest import FAST_TRAINING

HISTORY = [("头痛怎么办？", format_reply("用户头痛。", "建议休息。")),
           ("还要注意什么？ /no_think", format_reply("", "多喝水。"))]
ROW = {"question": "孩子发热39度，要去医院吗？", "think": "先看精神状态。", "answer": "精神差或持续高热请及时就医。"}


def template_ids(tokenizer, question, history=(), **kwargs):
    ids = tokenizer.apply_chat_template(build_messages(question, SYSTEM_PROMPT, history), tokenize=True,
                                        add_generation_prompt=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("history", [(), HISTORY], ids=["single-turn", "multi-turn"])
def test_prompt_without_thinking_is_qwen3_enable_thinking_false(tokenizer, history):
    ids = encode_prompt(tokenizer, "发热怎么办？", history=history, enable_thinking=False)
    assert ids == template_ids(tokenizer, "发热怎么办？", history, enable_thinking=False)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert encode_prompt(tokenizer, "发热怎么办？", history=history) == template_ids(tokenizer, "发热怎么办？", history)


def test_no_think_example_is_qwen3_rendering_and_trains_the_empty_block_answer_and_end(tokenizer):
    example = build_training_example(tokenizer, without_reasoning(ROW), 1024)
    messages = build_messages(ROW["question"] + " /no_think", reply=ROW["answer"])  # a reply without reasoning
    reference = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<think>\n\n</think>\n\n" + ROW["answer"] + "<|im_end|>" in reference
    assert example["input_ids"] == tokenizer(reference, add_special_tokens=False)["input_ids"]
    trained = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert trained == list(range(trained[0], len(example["input_ids"]) - 1))
    assert tokenizer.decode([example["input_ids"][i] for i in trained]) == \
        "<think>\n\n</think>\n\n" + ROW["answer"] + "<|im_end|>"
    assert example["no_think"] and not build_training_example(tokenizer, ROW, 1024)["no_think"]
    assert build_training_example(tokenizer, dict(ROW, think=""), 1024)["no_think"]  # a row without reasoning


def test_a_conversation_without_reasoning_is_qwen3_rendering_too(tokenizer):
    from medsft.chat_format import build_conversation_example

    messages = [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "休息。", "think": "想。"},
                {"role": "user", "content": ROW["question"]},
                {"role": "assistant", "content": ROW["answer"], "think": ROW["think"]}]
    example = build_conversation_example(tokenizer, without_reasoning({"messages": messages})["messages"], 2048)
    reference = tokenizer.apply_chat_template(
        build_messages(ROW["question"] + " /no_think", history=[("头痛怎么办？", "休息。")], reply=ROW["answer"]),
        tokenize=False)
    assert example["input_ids"] == tokenizer(reference, add_special_tokens=False)["input_ids"] and example["no_think"]
    assert messages[-1]["think"] == ROW["think"]  # the row itself is left as it was


def test_no_think_fraction_draws_the_same_for_a_seed_and_anew_each_epoch(tokenizer):
    assert drawn_indices(0.25, 100, 42, 0) == drawn_indices(0.25, 100, 42, 0)
    assert len(drawn_indices(0.25, 100, 42, 0)) == 25
    assert drawn_indices(0.25, 100, 42, 0) != drawn_indices(0.25, 100, 42, 1)
    assert drawn_indices(0.25, 100, 42, 0) != drawn_indices(0.25, 100, 7, 0)
    assert drawn_indices(0.0, 100, 42, 0) == frozenset() and len(drawn_indices(1.0, 100, 42, 3)) == 100

    class Settings:
        NO_THINK_FRACTION, SEED, MAX_LENGTH, SYSTEM_PROMPT = 0.5, 42, 1024, SYSTEM_PROMPT

    rows = [dict(ROW, question=f"第{i}个问题：{ROW['question']}") for i in range(8)]
    examples = [build_training_example(tokenizer, row, 1024) for row in rows]
    mix = NoThinkMix(examples, rows, tokenizer, Settings())

    def no_think_at(epoch):
        mix.set_epoch(epoch)
        drawn = [i for i in range(len(mix)) if mix[i]["no_think"]]
        assert drawn == [i for i in range(len(mix)) if mix.is_no_think(i)] and len(drawn) == 4
        for i in drawn:
            assert mix[i] == build_training_example(tokenizer, without_reasoning(rows[i]), 1024)
        return drawn

    assert no_think_at(0) != no_think_at(1) and no_think_at(0) == no_think_at(0)
    assert [e["no_think"] for e in mix_val_examples(examples, rows, tokenizer, Settings())].count(True) == 4


def test_dry_run_prints_one_example_of_each_kind_and_v3_masks_them_too(tiny_model_dir, short_data_dir, tmp_path,
                                                                       capsys):
    result = train_lora3.main([f"--model_path={tiny_model_dir}", f"--data_dir={short_data_dir}",
                               f"--output_dir={tmp_path}", *FAST_TRAINING, "--dry_run=True", "--no_think_fraction=0.5",
                               "--mask_prob=1.0"])
    out = capsys.readouterr().out
    assert "examples without reasoning (no-think) in epoch 1: 5 of 10" in out
    thinking = out.split("==== first training example, exactly as trained (between the rulers) ====\n")[1]
    assert "<think>\n用户问的是" in thinking.split("==== end ====")[0]
    shown = out.split("==== first training example without reasoning (no-think), exactly as trained")[1]
    example, trained = shown.split("==== end ====")[0].split("==== its trained part (labels != -100) ====\n")
    assert " /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n关于" in example
    assert "[MASK]" in example and trained.startswith("<think>\n\n</think>\n\n关于") and "用户问的是" not in example
    dataset = result["data"].train_set
    assert [dataset.is_no_think(i) for i in range(10)].count(True) == 5
    with pytest.raises(UserError, match="no_think_fraction must be in"):
        train_lora3.main([f"--data_dir={short_data_dir}", f"--output_dir={tmp_path}", "--no_think_fraction=1.5"])


def test_eval_loss_splits_think_answer_and_no_think_answer(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from medsft.batching import Collator
    from medsft.trainer import evaluate_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [ROW, dict(ROW, question="头痛怎么办？"), dict(ROW, think="")]
    examples = [build_training_example(tokenizer, rows[0], 1024),
                build_training_example(tokenizer, without_reasoning(rows[1]), 1024),
                build_training_example(tokenizer, rows[2], 1024)]
    collate = Collator(tokenizer.pad_token_id, packing=True)
    both = evaluate_loss(model, [collate(examples)])
    thinking_only = evaluate_loss(model, [collate(examples[:1])])
    no_think_only = evaluate_loss(model, [collate(examples[1:])])
    assert "no_think_answer_loss" not in thinking_only and both["tokens"] == thinking_only["tokens"] + \
        no_think_only["tokens"]
    assert both["think_loss"] == pytest.approx(thinking_only["think_loss"], rel=1e-5)
    assert both["answer_loss"] == pytest.approx(thinking_only["answer_loss"], rel=1e-5)
    assert both["no_think_answer_loss"] == pytest.approx(no_think_only["loss"], rel=1e-5)


def test_switches_in_the_chat_and_the_reply_start():
    assert thinking_switch("头痛 /no_think") is False and thinking_switch("/no_think 头痛 /think") is True
    assert thinking_switch("/thinking about it") is None and thinking_switch("头痛？/no_think") is False
    assert turn_thinks("下一个问题", HISTORY) is False  # Qwen3 follows the most recent switch
    assert turn_thinks("下一个问题 /think", HISTORY) and not turn_thinks("问题 /think", thinking=False)
    assert reply_start("<think>\n\n</think>\n\n回答") == "empty_think"
    assert reply_start("<think>\n想一想") == "thinks" and reply_start("直接回答") == "no_block"


# ---------------------------------------------------------------------------------------------------------
# inference_lora.py


def test_question_without_thinking_gets_the_answer_alone(tiny_model_dir, tokenizer, monkeypatch, capsys):
    import medsft.assistant
    from medsft import generation

    sent, real = [], generation.generate_from_prompts
    monkeypatch.setattr(medsft.assistant, "generate_from_prompts",
                        lambda model, tok, prompts, **kw: sent.extend(prompts) or real(model, tok, prompts, **kw))
    reply = inference_lora.main([f"--model_path={tiny_model_dir}", "--adapter_path=", "--thinking=False",
                                 "-q", "什么是高血压？", "--max_new_tokens=4"])
    out = capsys.readouterr().out
    assert sent == [template_ids(tokenizer, "什么是高血压？", enable_thinking=False)]
    assert "==== 思考 / thinking ====" not in out and reply.think == "" and "<think>" not in reply.text
    assert "| no thinking | 4 new tokens in " in out


def test_chat_soft_switch_per_turn(tiny_model_dir, monkeypatch, capsys):
    from medsft.assistant import MedicalAssistant

    assistant = MedicalAssistant(str(tiny_model_dir))
    monkeypatch.setitem(assistant.sampling, "max_new_tokens", 2)
    prompts, encode = [], assistant.encode
    monkeypatch.setattr(assistant, "encode", lambda q, s=None, h=(), t=None: prompts.append(
        assistant.tokenizer.decode(encode(q, s, h, t))) or encode(q, s, h, t))
    lines = iter(["/no_think", "头痛怎么办？ /no_think", "还有呢？", "/think 发热呢？"])

    def read_line(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = inference_lora.chat(assistant, read_line=read_line)
    out = capsys.readouterr().out
    assert "add it to a question, e.g. 什么是高血压？ /no_think" in out
    assert [q for q, _ in history] == ["头痛怎么办？ /no_think", "还有呢？", "/think 发热呢？"]
    assert "user\n头痛怎么办？ /no_think<|im_end|>\n<|im_start|>assistant\n" in prompts[0]
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)  # the soft switch leaves the template alone
    finish = [line for line in out.splitlines() if line.startswith("[finish: ")]
    assert ["no thinking" in line for line in finish] == [True, True, False]


def test_finish_line_tells_when_the_model_thinks_anyway(capsys):
    class ThinksAnyway:
        thinking, sampling = False, {"max_new_tokens": 8}

        def stream(self, question, scenario=None, history=()):
            yield "<think>\n还是想了\n</think>\n\n回答"
            self.last_reply = Reply("<think>\n还是想了\n</think>\n\n回答", "还是想了", "回答", "stop", 8)

    inference_lora.stream_answer(ThinksAnyway(), "问")
    assert "| thought anyway | 8 new tokens" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_reports_the_switch_for_base_and_adapter(trained_adapter, tiny_model_dir, short_data_dir,
                                                          tmp_path):
    import evaluate

    report = evaluate.main([f"--model_path={tiny_model_dir}", f"--adapter_path={trained_adapter}",
                            f"--data_dir={short_data_dir}", "--no_think_check=2", "--no_think_check_tokens=4",
                            "--no_think_fraction=0.5",
                            "--eval_batch_size=8", f"--report_path={tmp_path / 'r.json'}"])
    assert report["no_think_check_questions"] == 2
    for who in ("base", "adapter"):
        soft = report[f"{who}_no_think_empty_think_share"] + report[f"{who}_no_think_thinks_anyway_share"]
        assert 0 <= soft <= 1 and 0 <= report[f"{who}_thinking_off_thinks_anyway_share"] <= 1
    assert report["val_no_think_answer_loss"] > 0 and report["val_examples"] == 2
    assert json.loads((tmp_path / "r.json").read_text())["adapter_no_think_empty_think_share"] == \
        report["adapter_no_think_empty_think_share"]

"""Multi-turn conversations: each assistant reply is one example, byte for byte Qwen3's template up to that reply."""
import re

import pytest

from medsft.chat_format import IGNORE_INDEX, SYSTEM_PROMPT, build_conversation_example
from medsft.schemas import expand_conversation

TURNS = [("医生，我最近总是头痛，怎么回事？", "用户头痛，先问诱因。", "常见原因有睡眠不足、紧张和高血压。最近睡得好吗？"),
         ("睡得不好，血压也有点高。", "睡眠差加高血压，要建议测血压。", "建议每天早晚测量血压并记录，两周后到心内科复诊。"),
         ("需要吃降压药吗？", "", "是否用药要由医生根据几次测量的结果决定，请不要自行服药。")]
SYSTEM = {"role": "system", "content": "你是一名耐心的全科医生。"}


def conversation(turns: int, system: bool) -> list[dict]:
    messages = [SYSTEM] if system else []
    for question, think, answer in TURNS[:turns]:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "think": think}]
    return messages


def blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", text, re.S)


def template_text(tokenizer, messages, system_prompt=SYSTEM_PROMPT) -> str:
    """Qwen3's own rendering: every reply carries its reasoning_content; the template drops the earlier ones."""
    chat = [] if messages[0]["role"] == "system" else [{"role": "system", "content": system_prompt}]
    for m in messages:
        chat.append({"role": m["role"], "content": m["content"]}
                    | ({"reasoning_content": m["think"]} if m["role"] == "assistant" else {}))
    return tokenizer.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("turns", [2, 3])
@pytest.mark.parametrize("system", [False, True])
def test_every_reply_is_the_template_rendering_of_the_conversation_up_to_it(tokenizer, turns, system):
    row = {"id": "x", "messages": conversation(turns, system)}
    units = expand_conversation(row)
    assert len(units) == turns and all(u["id"] == "x" for u in units)
    for k, unit in enumerate(units):
        example = build_conversation_example(tokenizer, unit["messages"], 4096)
        reference = template_text(tokenizer, unit["messages"])
        assert example["input_ids"] == tokenizer(reference, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(example["input_ids"]) == reference
        # labels: the trained reply and its <|im_end|>, nothing of the earlier replies
        reply = f"<think>\n{TURNS[k][1]}\n</think>\n\n{TURNS[k][2]}<|im_end|>"  # no reasoning: <think>\n\n</think>
        trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
        assert tokenizer.decode(trained) == reply
        assert example["labels"][: -len(trained) - 1] == [IGNORE_INDEX] * (len(example["labels"]) - len(trained) - 1)
        assert reference.count("<think>") == 1 and (TURNS[k - 1][1] not in reference if k and TURNS[k - 1][1] else True)
        assert (SYSTEM["content"] in reference) == system and (SYSTEM_PROMPT in reference) != system


def test_a_long_conversation_drops_its_oldest_turns_never_half_a_reply(tokenizer):
    messages = conversation(3, True)
    whole = build_conversation_example(tokenizer, messages, 4096)
    without_first = [SYSTEM] + messages[3:]
    fits = len(build_conversation_example(tokenizer, without_first, 4096)["input_ids"])
    assert fits < len(whole["input_ids"])
    example = build_conversation_example(tokenizer, messages, fits)
    assert example["turns_dropped"] == 1 and example["think_cut"] == 0
    assert tokenizer.decode(example["input_ids"]) == template_text(tokenizer, without_first)
    last_only = build_conversation_example(tokenizer, messages, fits - 1)  # down to the trained turn alone
    assert last_only["turns_dropped"] == 2
    assert tokenizer.decode(last_only["input_ids"]) == template_text(tokenizer, [SYSTEM] + messages[5:])


def test_v3_masks_only_the_user_turns(tokenizer):
    from medsft.masking import MaskedQuestionDataset

    class Settings:
        LEXICON_PATH, MASK_PROB, MASK_STYLE, SEED = "data/medical_terms.tsv", 1.0, "mask", 42
        MAX_LENGTH, SYSTEM_PROMPT, LONG_EXAMPLES = 4096, SYSTEM_PROMPT, "shorten_think"
        MASK_POLICY, NO_THINK_FRACTION = "seed", 0.0

    messages = conversation(3, True)
    messages[0] = {"role": "system", "content": "你是医生，擅长高血压和头痛。"}  # lexicon terms outside user turns too
    messages[3]["content"] += "高血压要注意头痛。"
    units = expand_conversation({"id": "x", "messages": messages})
    dataset = MaskedQuestionDataset(units, tokenizer, Settings())
    masked = tokenizer.decode(dataset[2]["input_ids"])
    plain = template_text(tokenizer, units[2]["messages"])
    assert dataset.masked_terms == dataset.found_terms > 2
    masked_blocks, plain_blocks = blocks(masked), blocks(plain)
    assert [role for role, _ in masked_blocks] == [role for role, _ in plain_blocks]
    for (role, text), (_, original) in zip(masked_blocks, plain_blocks):
        if role == "user":
            assert "[MASK]" in text and text != original
        else:  # the system prompt and the replies keep their lexicon terms (高血压, 头痛, 降压药...)
            assert text == original
    trained = lambda ex: [label for label in ex["labels"] if label != IGNORE_INDEX]  # noqa: E731
    assert trained(dataset[2]) == trained(build_conversation_example(tokenizer, units[2]["messages"], 4096))


# ---- the scripts on every schema ------------------------------------------------------------------------------

SINGLE_TURN_SCHEMAS = ("gradio_seed.jsonl", "alpaca.json", "medical_o1.json")
CONVERSATION_SCHEMAS = ("sharegpt.json", "openai_messages.jsonl")


def tag_questions(name: str, row: dict) -> dict:
    """The samples share their questions; a tag per schema keeps them apart (data.py drops repeated questions)."""
    tag = f"（{name}）"
    if "conversations" in row:
        row["conversations"] = [t | {"value": t["value"] + tag} if t["from"] == "human" else t
                                for t in row["conversations"]]
    elif "messages" in row:
        row["messages"] = [m | {"content": m["content"] + tag} if m["role"] == "user" else m for m in row["messages"]]
    else:
        field = {"gradio_seed.jsonl": "input", "alpaca.json": "instruction", "medical_o1.json": "Question"}
        row[field.get(name, "prompt")] += tag
    return row


@pytest.fixture(scope="module")
def schema_split(tmp_path_factory):
    """One split of three rows of each shipped schema sample and of the column-mapped CSV, in one folder.

    The rows are written as .jsonl in memory (data.py reads a folder's .jsonl files before any .json);
    the column-mapped CSV needs --columns, so its own split is appended: split files are schema-blind."""
    import csv
    import io
    import json

    import data
    from tests.conftest import ROOT

    examples, folder = ROOT / "data" / "examples", tmp_path_factory.mktemp("schemas")
    (folder / "in").mkdir()
    for name in SINGLE_TURN_SCHEMAS + CONVERSATION_SCHEMAS:
        text = (examples / name).read_text(encoding="utf-8")
        rows = json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
        (folder / "in" / f"{name.split('.')[0]}.jsonl").write_text(
            "".join(json.dumps(tag_questions(name, r), ensure_ascii=False) + "\n" for r in rows[:3]), encoding="utf-8")
    manifest = data.main([f"--source={folder / 'in'}", f"--data_dir={folder}", "--val_fraction=0.2"])
    assert sorted(manifest["schemas"].values()) == ["alpaca", "gradio_seed", "medical_o1", "openai", "sharegpt"]
    assert manifest["counts"] == {"val": 3, "train": 12} and not manifest["dropped"]
    mapped = list(csv.DictReader(io.StringIO((examples / "custom_columns.csv").read_text(encoding="utf-8"))))[:4]
    with open(folder / "columns.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(mapped[0]))
        writer.writeheader()
        writer.writerows(tag_questions("columns", r) for r in mapped)
    data.main([f"--source={folder / 'columns.csv'}", f"--data_dir={folder / 'columns'}", "--val_fraction=0.25",
               "--columns=question:prompt,think:reasoning,answer:response"])
    for name in ("train.jsonl", "val.jsonl"):
        with open(folder / name, "a", encoding="utf-8") as f:
            f.write((folder / "columns" / name).read_text(encoding="utf-8"))
    return folder


def test_train_lora_trains_every_example_of_every_schema_and_evaluate_scores_conversations(
        tiny_model_dir, schema_split, tmp_path):
    import json

    import evaluate
    import train_lora
    from medsft.records import read_jsonl
    from medsft.schemas import opening_question
    from tests.conftest import FAST_TRAINING

    train = [r for _, r in read_jsonl(schema_split / "train.jsonl")]
    val = [r for _, r in read_jsonl(schema_split / "val.jsonl")]
    for name in SINGLE_TURN_SCHEMAS + CONVERSATION_SCHEMAS + ("columns",):
        assert any(f"（{name}）" in opening_question(r) for r in train), name
    assert any("messages" in r for r in val) and any("question" in r for r in val)
    settings = [*FAST_TRAINING, "--max_steps=-1", "--epochs=1", "--batch_size=8", "--gradient_accumulation=1",
                "--eval_steps=50", "--save_steps=50", "--max_length=512", "--eval_batch_size=16"]
    result = train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={schema_split}",
                              f"--output_dir={tmp_path}", *settings])
    stats, summary = result["data"].stats, result["summary"]
    assert stats["dropped"] == 0 and stats["train_examples"] > len(train)  # conversations: one example per reply
    assert summary["steps"] == -(-stats["train_examples"] // 8)  # one epoch: every example of every schema
    assert summary["train_tokens"] == stats["train_tokens"]
    report = evaluate.main([f"--model_path={tiny_model_dir}", f"--adapter_path={tmp_path / 'final'}",
                            f"--data_dir={schema_split}", "--eval_batch_size=16",
                            f"--report_path={tmp_path / 'r.json'}"])
    assert report["val_examples"] == stats["val_examples"] > len(val)
    assert report["val_loss"] == pytest.approx(summary["best_val_loss"], rel=1e-5)
    assert json.loads((tmp_path / "r.json").read_text())["val_think_loss"] > 0


def test_dry_run_prints_a_conversation_as_the_template_renders_it(tiny_model_dir, tokenizer, tmp_path, capsys):
    import data
    import train_lora
    from medsft.records import read_jsonl
    from tests.conftest import ROOT

    data.main([f"--source={ROOT / 'data' / 'examples' / 'openai_messages.jsonl'}", f"--data_dir={tmp_path}"])
    capsys.readouterr()
    train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'dry'}",
                     "--dry_run=True", "--max_length=2048"])
    out = capsys.readouterr().out
    first = read_jsonl(tmp_path / "train.jsonl")[0][1]["messages"]
    rendered = template_text(tokenizer, first)
    assert rendered.count("<|im_start|>assistant") == 2
    shown = out.split("==== first training example, exactly as trained (between the rulers) ====\n")[1]
    assert shown.split("\n==== its trained part")[0] == rendered
    trained = out.split("==== its trained part (labels != -100) ====\n")[1].split("\n==== end ====")[0]
    assert trained == rendered.split("<|im_start|>assistant\n")[-1].removesuffix("\n")

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

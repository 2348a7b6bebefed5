"""The one chat format: Qwen3's own template, shared by training and inference.

A training example is the text `tokenizer.apply_chat_template` renders for
[system: PROMPT, user: question, assistant: "<think>\n{think}\n</think>\n\n{answer}"], byte for byte.
Only the assistant's reply and the <|im_end|> that closes it are trained: that end token is what makes
generation stop (the originals ended replies with <|endoftext|> and cut it off when truncating).
"""
import re

SYSTEM_PROMPT = "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"
END_OF_TURN = "<|im_end|>"
IGNORE_INDEX = -100

_THINK_TAGS = re.compile(r"</?think>")
_BLANK_RUNS = re.compile(r"\n\s*\n+")


def normalise_text(text: str) -> str:
    """Unify newlines, strip each line's trailing spaces, collapse blank-line runs, strip the ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u3000", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n", text).strip()


def clean_think(text: str) -> str:
    """Remove stray <think>/</think> tags inside a think text, then normalise it."""
    return normalise_text(_THINK_TAGS.sub("", text))


def format_reply(think: str, answer: str) -> str:
    """The assistant turn in Qwen3's thinking format (the template's own spacing)."""
    return f"<think>\n{think}\n</think>\n\n{answer}"


def build_messages(question: str, system_prompt: str = SYSTEM_PROMPT, history=(), reply: str | None = None) -> list:
    """Chat messages for one turn; `history` holds earlier (question, reply) pairs of a chat."""
    messages = [{"role": "system", "content": system_prompt}]
    for past_question, past_reply in history:
        messages += [{"role": "user", "content": past_question}, {"role": "assistant", "content": past_reply}]
    messages.append({"role": "user", "content": question})
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    return messages


def render_prompt(tokenizer, question: str, system_prompt: str = SYSTEM_PROMPT, history=()) -> str:
    """The inference prompt; it ends with '<|im_start|>assistant\\n', where the reply starts."""
    messages = build_messages(question, system_prompt, history)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_training_text(tokenizer, question: str, think: str, answer: str, system_prompt: str = SYSTEM_PROMPT):
    """(prompt, reply) whose concatenation is the whole training text; the reply is what is trained."""
    prompt = render_prompt(tokenizer, question, system_prompt)
    return prompt, format_reply(think, answer) + END_OF_TURN + "\n"


def build_training_example(tokenizer, row: dict, max_length: int, system_prompt: str = SYSTEM_PROMPT,
                           question: str | None = None) -> dict | None:
    """Token ids and labels for one row, or None when it cannot fit `max_length` even with its think cut.

    An example longer than `max_length` never loses its answer or end token: the think text is shortened
    (at a token boundary, from the end) until the whole example fits. `question` overrides the row's
    question (v3 masks terms in it). The result also has `think_end` (index of the </think> token, so the
    think and answer parts of the loss can be told apart) and `think_cut` (tokens removed from the think).
    """
    question = row["question"] if question is None else question
    think, answer = row["think"], row["answer"]
    prompt, reply = render_training_text(tokenizer, question, think, answer, system_prompt)
    example = _tokenize(tokenizer, prompt, reply)
    if len(example["input_ids"]) <= max_length:
        return example | {"think_cut": 0}
    think_ids = tokenizer(think, add_special_tokens=False, return_offsets_mapping=True)
    offsets = think_ids["offset_mapping"]
    keep = len(offsets) - (len(example["input_ids"]) - max_length)
    while keep > 0:  # re-tokenising the joined text can merge tokens differently; trim until it fits
        cut = think[: offsets[keep - 1][1]].rstrip()
        example = _tokenize(tokenizer, prompt, format_reply(cut, answer) + END_OF_TURN + "\n")
        if len(example["input_ids"]) <= max_length:
            return example | {"think_cut": len(offsets) - keep}
        keep -= max(1, len(example["input_ids"]) - max_length)
    return None


def _tokenize(tokenizer, prompt: str, reply: str) -> dict:
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = tokenizer(prompt + reply, add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    think_end_id = tokenizer.convert_tokens_to_ids("</think>")
    end = len(ids) - 1 - ids[::-1].index(end_id)  # the reply's <|im_end|>; the "\n" after it is not trained
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len : end + 1] + [IGNORE_INDEX] * (len(ids) - end - 1)
    think_end = prompt_len + ids[prompt_len:].index(think_end_id)
    return {"input_ids": ids, "labels": labels, "think_end": think_end}


_REPLY = re.compile(r"^\s*(?:<think>(?P<think>.*?)(?:</think>|$))?(?P<answer>.*)$", re.S)


def split_reply(text: str) -> tuple[str, str]:
    """(think, answer) of a generated reply; a reply cut before </think> has all its text as think."""
    match = _REPLY.match(text)
    return match["think"].strip() if match["think"] else "", match["answer"].strip()

"""The one chat format: Qwen3's own template, shared by training and inference.

A training example is the text `tokenizer.apply_chat_template` renders for
[system: PROMPT, user: question, assistant: "<think>\n{think}\n</think>\n\n{answer}"], byte for byte.
Only the assistant's reply and the <|im_end|> that closes it are trained: that end token is what makes
generation stop (the originals ended replies with <|endoftext|> and cut it off when truncating).

Qwen3 is hybrid: `enable_thinking=False` (the hard switch) ends the prompt with an empty think block, so the
reply is the answer alone; "/think" or "/no_think" in a user turn (the soft switch) asks the model itself, which
then thinks, or writes the empty block and answers. A row with an empty think is Qwen3's rendering of a reply
without reasoning: "<think>\n\n</think>\n\n{answer}" (medsft/no_think.py adds " /no_think" to its question).

Text from the data or the user (question, history, think, answer, system prompt) is always plain text:
a question that contains "<|im_end|>" or "<think>" is tokenised as those characters, never as the control
tokens, while the template's own <|im_start|>, <|im_end|>, <think> and </think> stay single special tokens.
`encode_prompt` and `build_training_example` give such ids; for ordinary text they equal tokenizer(text).
"""
import re

SYSTEM_PROMPT = "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"
END_OF_TURN = "<|im_end|>"
IGNORE_INDEX = -100

THINK_SWITCH, NO_THINK_SWITCH = "/think", "/no_think"  # Qwen3's soft switches, typed in a user turn

_SWITCH = re.compile(r"/(no_)?think(?![A-Za-z0-9_])")
_THINK_TAGS = re.compile(r"</?think>")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalise_text(text: str) -> str:
    """The text as the data has it, paragraph breaks kept: unify newlines, strip each line's trailing spaces,
    collapse runs of three or more newlines to two (one blank line), strip the ends.

    "## 诊断\r\n\r\n可能…  \n\n\n\n## 建议\n" gives "## 诊断\n\n可能…\n\n## 建议": Markdown keeps its paragraphs.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u3000", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def row_system_prompt(row: dict, default: str = SYSTEM_PROMPT) -> str:
    """A single-turn row's own system prompt (its `instruction`: from --columns=...,system:COL or the Gradio seed's
    instruction), else `default` (the run's SYSTEM_PROMPT). The dataset's rows carry the project's default prompt
    as their instruction: that counts as none, so they render as before and --system_prompt still applies."""
    own = row.get("instruction")
    return own if isinstance(own, str) and own and own != SYSTEM_PROMPT else default


def system_prompt_of(row: dict, default: str = SYSTEM_PROMPT) -> str:
    """The system prompt a row is trained and asked with: a conversation's system turn, a single-turn row's own
    (row_system_prompt), else `default`."""
    if "messages" in row:
        first = row["messages"][0] if row["messages"] else {}
        return first["content"] if first.get("role") == "system" else default
    return row_system_prompt(row, default)


def has_own_system_prompt(row: dict) -> bool:
    """Whether a row brings its own system prompt (a single-turn row's instruction, a conversation's system turn)."""
    if "messages" in row:
        first = row["messages"][0] if row["messages"] else {}
        return first.get("role") == "system" and first.get("content") != SYSTEM_PROMPT
    return row_system_prompt(row, "") != ""


def clean_think(text: str) -> str:
    """Remove stray <think>/</think> tags inside a think text, then normalise it."""
    return normalise_text(_THINK_TAGS.sub("", text))


def format_reply(think: str, answer: str) -> str:
    """The assistant turn in Qwen3's thinking format (the template's own spacing)."""
    return _marked_reply(think, answer).text


def _marked_reply(think: str, answer: str) -> "_Marked":
    return _Marked().add("<think>\n").add(think, plain=True).add("\n</think>\n\n").add(answer, plain=True)


def build_messages(question: str, system_prompt: str = SYSTEM_PROMPT, history=(), reply: str | None = None) -> list:
    """Chat messages for one turn; `history` holds earlier (question, reply) pairs of a chat."""
    messages = [{"role": "system", "content": system_prompt}]
    for past_question, past_reply in history:
        messages += [{"role": "user", "content": past_question}, {"role": "assistant", "content": past_reply}]
    messages.append({"role": "user", "content": question})
    if reply is not None:
        messages.append({"role": "assistant", "content": reply})
    return messages


def render_prompt(tokenizer, question: str, system_prompt: str = SYSTEM_PROMPT, history=(),
                  enable_thinking: bool = True) -> str:
    """The inference prompt; it ends with '<|im_start|>assistant\\n', where the reply starts (with
    enable_thinking=False, Qwen3's hard switch, after an empty '<think>\\n\\n</think>\\n\\n')."""
    return _render_prompt(tokenizer, question, system_prompt, history, enable_thinking).text


def encode_prompt(tokenizer, question: str, system_prompt: str = SYSTEM_PROMPT, history=(),
                  enable_thinking: bool = True) -> list[int]:
    """The token ids of render_prompt's text, with the question, history and system prompt as plain text."""
    return _render_prompt(tokenizer, question, system_prompt, history, enable_thinking).encode(tokenizer)


def with_no_think_switch(question: str) -> str:
    """The question as Qwen3's soft switch asks for a reply without thinking: "{question} /no_think"."""
    return f"{question} {NO_THINK_SWITCH}"


def thinking_switch(text: str) -> bool | None:
    """True for a "/think", False for a "/no_think" (the last one wins), None when the text has neither."""
    found = _SWITCH.findall(text)
    return None if not found else not found[-1]


def turn_thinks(question: str, history=(), thinking: bool = True) -> bool:
    """Whether this turn asks for thinking: never with the hard switch off; else the most recent soft switch
    in the user's turns (Qwen3 follows the latest one), thinking when there is none."""
    if not thinking:
        return False
    for text in [question, *(past_question for past_question, _ in reversed(list(history)))]:
        switch = thinking_switch(text)
        if switch is not None:
            return switch
    return True


def render_training_text(tokenizer, question: str, think: str, answer: str, system_prompt: str = SYSTEM_PROMPT):
    """(prompt, reply) whose concatenation is the whole training text; the reply is what is trained."""
    prompt = render_prompt(tokenizer, question, system_prompt)
    return prompt, format_reply(think, answer) + END_OF_TURN + "\n"


class _Marked:
    """Text built from the template's own structure and plain-text spans (content from the data or the user)."""

    def __init__(self):
        self.text, self.plain = "", []

    def add(self, text, plain: bool = False) -> "_Marked":
        """Append text (plain: from the data or the user), or another _Marked with its plain spans."""
        if isinstance(text, _Marked):
            self.plain += [(a + len(self.text), b + len(self.text)) for a, b in text.plain]
            text = text.text
        elif plain and text:
            self.plain.append((len(self.text), len(self.text) + len(text)))
        self.text += text
        return self

    def ordinary(self, tokenizer) -> bool:
        """No added token's text overlaps a plain span (no control text typed in the contents)."""
        return not any(a < match.end() and match.start() < b for match in
                       _added_token_pattern(tokenizer).finditer(self.text) for a, b in self.plain)

    def encode(self, tokenizer) -> list[int]:
        """Split at the template's added tokens only; everything between them is tokenised as plain text.

        The tokenizer itself splits at every added token and tokenises the pieces between them separately,
        so for text without control text in its plain spans the ids are exactly tokenizer(text)'s.
        """
        if self.ordinary(tokenizer):  # the tokenizer's own split at added tokens is this one: one call in Rust
            return tokenizer.backend_tokenizer.encode(self.text, add_special_tokens=False).ids
        ids, start = [], 0
        for match in _added_token_pattern(tokenizer).finditer(self.text):
            if any(a < match.end() and match.start() < b for a, b in self.plain):
                continue
            ids += _plain_ids(tokenizer, self.text[start : match.start()])
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            start = match.end()
        return ids + _plain_ids(tokenizer, self.text[start:])


def _render_prompt(tokenizer, question, system_prompt, history, enable_thinking: bool = True) -> _Marked:
    """The chat template rendered with a slot for each content, then the contents put in the slots as plain text."""
    contents = [system_prompt]
    for past_question, past_reply in history:
        contents += [past_question, _earlier_reply(past_reply)]
    contents.append(question)
    slot = "\ue000"
    while any(slot in c for c in contents):
        slot += "\ue000"
    slots = [f"{slot}{i}\ue001" for i in range(len(contents))]
    messages = [{"role": "system", "content": slots[0]}]
    for i in range(1, len(contents) - 1, 2):
        messages += [{"role": "user", "content": slots[i]},
                     {"role": "assistant", "content": slots[i + 1], "reasoning_content": ""}]
    messages.append({"role": "user", "content": slots[-1]})
    skeleton = _skeleton(tokenizer, messages, enable_thinking)
    marked = _Marked()
    for part in re.split(f"({re.escape(slot)}\\d+\ue001)", skeleton):
        if part in slots:
            marked.add(contents[slots.index(part)], plain=True)
        else:
            marked.add(part)
    return marked


def _skeleton(tokenizer, messages: list[dict], enable_thinking: bool) -> str:
    """The template rendered around the slots, once per structure: the slots hold no content, so the same
    (template, slots, roles, enable_thinking) always renders the same text."""
    key = (tokenizer.chat_template, enable_thinking, tuple((m["role"], m["content"]) for m in messages))
    cache = tokenizer.__dict__.setdefault("_medsft_skeletons", {})
    if key not in cache:
        if len(cache) > 256:
            cache.clear()
        cache[key] = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                   enable_thinking=enable_thinking)
    return cache[key]


def _earlier_reply(reply: str) -> str:
    """What Qwen3's template keeps of a reply before the last question: the answer, its think dropped."""
    return reply.split("</think>")[-1].lstrip("\n") if "</think>" in reply else reply


def _added_token_pattern(tokenizer) -> re.Pattern:
    pattern = getattr(tokenizer, "_medsft_added_tokens", None)
    if pattern is None:
        tokens = sorted((t.content for t in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, tokens)))
        tokenizer._medsft_added_tokens = pattern
    return pattern


def _plain_ids(tokenizer, text: str) -> list[int]:
    """Ids of text with no added tokens recognised (split_special_tokens=True still matches <think>)."""
    if not text:
        return []
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    pieces = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer is not None else [(text, None)]
    return [token.id for piece, _ in pieces for token in backend.model.tokenize(piece)]


def build_training_example(tokenizer, row: dict, max_length: int, system_prompt: str = SYSTEM_PROMPT,
                           question: str | None = None) -> dict | None:
    """Token ids and labels for one row, or None when it cannot fit `max_length` even with its think cut.

    The system prompt is the row's own (row_system_prompt: its `instruction`), else `system_prompt`.
    An example longer than `max_length` never loses its answer or end token: the think text is shortened
    (at a token boundary, from the end) until the whole example fits. `question` overrides the row's
    question (v3 masks terms in it). The result also has `think_end` (index of the </think> token, so the
    think and answer parts of the loss can be told apart), `think_cut` (tokens removed from the think) and
    `no_think` (the think is empty: a reply without reasoning, which Qwen3 renders as an empty think block).
    """
    question = row["question"] if question is None else question
    think, answer = row["think"], row["answer"]
    prompt = _render_prompt(tokenizer, question, row_system_prompt(row, system_prompt), ())
    example = _tokenize(tokenizer, prompt, think, answer)
    if len(example["input_ids"]) <= max_length:
        return example | {"think_cut": 0}
    think_ids = tokenizer(think, add_special_tokens=False, return_offsets_mapping=True)
    offsets = think_ids["offset_mapping"]
    keep = len(offsets) - (len(example["input_ids"]) - max_length)
    while keep > 0:  # re-tokenising the joined text can merge tokens differently; trim until it fits
        cut = think[: offsets[keep - 1][1]].rstrip()
        example = _tokenize(tokenizer, prompt, cut, answer)
        if len(example["input_ids"]) <= max_length:
            return example | {"think_cut": len(offsets) - keep}
        keep -= max(1, len(example["input_ids"]) - max_length)
    return None


def _tokenize(tokenizer, prompt: _Marked, think: str, answer: str) -> dict:
    prompt_len = len(prompt.encode(tokenizer))
    ids = _Marked().add(prompt).add(_marked_reply(think, answer)).add(END_OF_TURN + "\n").encode(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    think_end_id = tokenizer.convert_tokens_to_ids("</think>")
    end = len(ids) - 1 - ids[::-1].index(end_id)  # the reply's <|im_end|>; the "\n" after it is not trained
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len : end + 1] + [IGNORE_INDEX] * (len(ids) - end - 1)
    think_end = prompt_len + ids[prompt_len:].index(think_end_id)
    return {"input_ids": ids, "labels": labels, "think_end": think_end, "no_think": not think}


_REPLY = re.compile(r"^\s*(?:<think>(?P<think>.*?)(?:</think>|$))?(?P<answer>.*)$", re.S)


def split_reply(text: str) -> tuple[str, str]:
    """(think, answer) of a generated reply; a reply cut before </think> has all its text as think."""
    match = _REPLY.match(text)
    return match["think"].strip() if match["think"] else "", match["answer"].strip()


# ---------------------------------------------------------------------------------------------------------
# multi-turn conversations: one example per assistant reply


def build_conversation_example(tokenizer, messages: list[dict], max_length: int, system_prompt: str = SYSTEM_PROMPT,
                               mask_user=None) -> dict | None:
    """The example that trains a conversation's last message, an assistant reply.

    It is the text Qwen3's template renders for the conversation up to that reply: the conversation's own system
    message (else `system_prompt`), earlier replies without their think (the template drops it), the <think> block
    on the trained reply only. Only that reply and its <|im_end|> carry labels. Longer than `max_length`, the
    oldest (question, reply) pairs are dropped first, as a chat does; with none left, the think is shortened as for
    a single turn. Messages are {"role", "content"} with "think" on assistant turns. `mask_user` (v3) rewrites
    the user turns' text. The result also has `turns_dropped`.
    """
    system, question, history = split_conversation(messages, system_prompt, mask_user)
    reply = messages[-1]
    for dropped in range(len(history)):  # whole turns only: never half a reply
        prompt = _render_prompt(tokenizer, question, system, history[dropped:])
        example = _tokenize(tokenizer, prompt, reply["think"], reply["content"])
        if len(example["input_ids"]) <= max_length:
            return example | {"think_cut": 0, "turns_dropped": dropped}
    row = {"question": question, "think": reply["think"], "answer": reply["content"]}
    example = build_training_example(tokenizer, row, max_length, system)
    return None if example is None else example | {"turns_dropped": len(history)}


def split_conversation(messages: list[dict], system_prompt: str = SYSTEM_PROMPT, mask_user=None):
    """(system prompt, last question, earlier (question, reply) pairs) of a conversation that ends with a reply:
    its own system message, else `system_prompt`; `mask_user` (v3) rewrites the user turns' text."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else system_prompt
    body = [m["content"] if m["role"] != "user" or mask_user is None else mask_user(m["content"])
            for m in messages if m["role"] != "system"]
    return system, body[-2], list(zip(body[0:-2:2], body[1:-2:2]))


def build_row_example(tokenizer, row: dict, max_length: int, system_prompt: str = SYSTEM_PROMPT) -> dict | None:
    """The example of a split row: a single-turn row, or a conversation prefix ending with the reply it trains."""
    if "messages" in row:
        return build_conversation_example(tokenizer, row["messages"], max_length, system_prompt)
    return build_training_example(tokenizer, row, max_length, system_prompt)

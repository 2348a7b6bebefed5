"""Keeping Qwen3's thinking switch: training examples without reasoning, and a check that the switch still works.

Qwen3 answers at once after an empty think block when a user turn says "/no_think" (or the prompt ends with
that block: enable_thinking=False). Fine-tuning on replies that all think can erase that mode, so
NO_THINK_FRACTION of the training examples, re-drawn each epoch from (SEED, epoch), are rendered as Qwen3
renders a reply without reasoning: the question with " /no_think", then "<think>\\n\\n</think>\\n\\n{answer}".
The val set gets the same share once, drawn the same way in training and in evaluate.py, so its loss splits
into think, answer and no-think answer.
"""
import functools
import random
import re

from medsft.chat_format import build_row_example, encode_prompt, with_no_think_switch


@functools.lru_cache(maxsize=8)
def drawn_indices(fraction: float, size: int, seed, epoch: int = 0) -> frozenset[int]:
    """round(fraction * size) indices out of range(size), the same for the same (seed, epoch) in every process."""
    if fraction <= 0 or not size:
        return frozenset()
    rng = random.Random(f"no-think-{seed}-{epoch}")  # str seeds hash the same in every process
    return frozenset(rng.sample(range(size), round(fraction * size)))


def without_reasoning(row: dict) -> dict:
    """The row as Qwen3 renders a reply without reasoning: its (last) question ends with " /no_think" and the
    reply it trains has an empty think. A row is single-turn, or a conversation ending with the trained reply."""
    if "messages" in row:
        *earlier, question, reply = row["messages"]
        return {**row, "messages": [*earlier, {**question, "content": with_no_think_switch(question["content"])},
                                    {**reply, "think": ""}]}
    return {**row, "question": with_no_think_switch(row["question"]), "think": ""}


def has_empty_think(row: dict) -> bool:
    """A data row whose trained reply has no reasoning (it counts as no-think in the loss, as it is)."""
    return not (row["messages"][-1].get("think") if "messages" in row else row["think"])


def no_think_example(tokenizer, row: dict, cfg, fallback: dict | None = None) -> dict:
    """The row as a reply without reasoning; `fallback` (its thinking example) in the rare case that it does not fit."""
    example = build_row_example(tokenizer, without_reasoning(row), cfg.MAX_LENGTH, cfg.SYSTEM_PROMPT)
    return fallback if example is None else example


def mix_val_examples(examples: list, rows: list, tokenizer, cfg) -> list:
    """Val examples with NO_THINK_FRACTION of them (a fixed draw, independent of SEED) rendered without reasoning."""
    drawn = drawn_indices(cfg.NO_THINK_FRACTION, len(examples), "val")
    return [no_think_example(tokenizer, rows[i], cfg, fallback=e) if i in drawn else e for i, e in enumerate(examples)]


class NoThinkMix:
    """Training examples of which NO_THINK_FRACTION are drawn afresh each epoch as replies without reasoning
    (a torch map-style dataset; the trainer's SetEpochCallback sets the epoch)."""

    def __init__(self, examples: list, rows: list, tokenizer, cfg):
        self.examples, self.rows, self.tokenizer, self.cfg = examples, rows, tokenizer, cfg
        self.epoch, self._without_reasoning = 0, {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def example_is_no_think(self, index: int) -> bool:
        """The example itself is a reply without reasoning (its row has no think)."""
        if hasattr(self.examples, "is_no_think"):
            return self.examples.is_no_think(index)
        return self.examples[index]["no_think"]

    def is_no_think(self, index: int) -> bool:
        return index in drawn_indices(self.cfg.NO_THINK_FRACTION, len(self), self.cfg.SEED, self.epoch) \
            or self.example_is_no_think(index)

    def every_variant(self):
        """Every token a draw can feed the model (EMBEDDING_MODE="tokens" trains their rows): the examples with
        their reasoning, and one without it for the tokens of " /no_think" (the rest are the same tokens)."""
        yield from self.examples
        yield no_think_example(self.tokenizer, self.rows[0], self.cfg, fallback=self.examples[0])

    def variant_token_ids(self) -> set[int]:
        """The token ids of every_variant's examples, read from the examples as tokenized once."""
        if not hasattr(self.examples, "token_set"):
            return {token for example in self.every_variant() for token in example["input_ids"]}
        extra = no_think_example(self.tokenizer, self.rows[0], self.cfg, fallback=self.examples[0])
        return self.examples.token_set() | set(extra["input_ids"])

    def lengths(self) -> list[int]:
        """Each example's token count in the current epoch (the drawn ones without reasoning)."""
        if not hasattr(self.examples, "lengths"):
            return [len(self[i]["input_ids"]) for i in range(len(self))]
        lengths = self.examples.lengths().tolist()
        for index in drawn_indices(self.cfg.NO_THINK_FRACTION, len(self), self.cfg.SEED, self.epoch):
            lengths[index] = len(self[index]["input_ids"])
        return lengths

    def __getitem__(self, index: int) -> dict:
        if self.example_is_no_think(index) or not self.is_no_think(index):
            return self.examples[index]
        if index not in self._without_reasoning:  # the same every epoch it is drawn: built once
            self._without_reasoning[index] = no_think_example(self.tokenizer, self.rows[index], self.cfg,
                                                              fallback=self.examples[index])
        return self._without_reasoning[index]


# ---------------------------------------------------------------------------------------------------------
# evaluate.py: does the model still answer at once when asked to?

_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>")


def reply_start(text: str) -> str:
    """"empty_think" (the empty block, then the answer), "thinks" (a think with text in it) or "no_block"."""
    if _EMPTY_THINK.match(text):
        return "empty_think"
    return "thinks" if text.lstrip().startswith("<think>") else "no_block"


def switch_check(model, tokenizer, questions: list[str], system_prompt, max_new_tokens: int, batch_size: int,
                 **sampling) -> dict:
    """The shares of replies that honour each way of switching thinking off (only the reply's start is generated).
    `system_prompt` is one for all questions or one per question (each row's own).

    /no_think in the question (soft switch): the share that starts with an empty think block and the share
    that starts thinking anyway. enable_thinking=False (hard switch, the empty block already in the prompt):
    the share that opens a think block anyway.
    """
    from medsft.generation import generate_from_prompts

    def starts(prompts):
        replies = []
        for first in range(0, len(prompts), batch_size):
            replies += generate_from_prompts(model, tokenizer, prompts[first : first + batch_size],
                                             max_new_tokens=max_new_tokens, **sampling)
        return [reply_start(reply.text) for reply in replies]

    prompts = [system_prompt] * len(questions) if isinstance(system_prompt, str) else system_prompt
    soft = starts([encode_prompt(tokenizer, with_no_think_switch(q), p) for q, p in zip(questions, prompts)])
    hard = starts([encode_prompt(tokenizer, q, p, enable_thinking=False) for q, p in zip(questions, prompts)])
    n = len(questions)
    return {"no_think_empty_think_share": soft.count("empty_think") / n,
            "no_think_thinks_anyway_share": soft.count("thinks") / n,
            "thinking_off_thinks_anyway_share": (n - hard.count("no_block")) / n}

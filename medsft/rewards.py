"""GRPO's verifiable rewards for exam questions, each a plain function in TRL's reward-function form:
`reward(completions, **columns) -> list[float]`, one score per completion, combined by GRPOTrainer with the
weights below (REWARD_WEIGHTS, in the order of reward_functions()).

A completion is the reply as TRL decodes it: "<think>\\n...\\n</think>\\n\\n答案：C" (the end token dropped). The
answer is read by the one reader benchmark.py's generate mode uses (medsft/answer_reader.py), after the last
</think>: never parsed here. `completion_ids` (TRL passes them) tell a reply cut off at MAX_COMPLETION_LENGTH
(no end token) and count the think's tokens.

Why these four (and why no free-text reward): a keyword or judge reward on medical free text is gamed or slow;
an exam letter is checkable. format keeps Qwen3's native shape (no <answer> tags), language keeps the answer
Chinese (DeepSeek-R1 added a language-consistency reward because RL mixed languages), and the think budget keeps
the think from growing until the answer is cut off.
"""
import re

from medsft.answer_reader import is_correct, read_answer

# the weights: a right answer (1.0) always outscores a wrong one however well it is shaped (0.25 + 0.1 + 0.25 < 1)
CORRECT_WEIGHT = 1.0
FORMAT_WEIGHT = 0.25
LANGUAGE_WEIGHT = 0.1
THINK_BUDGET_WEIGHT = 0.25

# Qwen3's token ids (one tokenizer for 0.6B-32B; tests/test_grpo.py checks them against it)
END_OF_REPLY_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>: a completion without one was cut off
THINK_END_ID = 151668  # </think>

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_ANSWER_STATEMENT = re.compile(r"答案\s*(?:是|为)?\s*[:：]?\s*[A-E]")  # "答案：C", "答案是 B", "答案：AC"
_HAN = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")
_LATIN_WORD = re.compile(r"[A-Za-z]{2,}")  # single letters are option letters, not English


def answer_part(completion: str) -> str:
    """The text after the last </think> ("" when there is none)."""
    return completion.rsplit(THINK_CLOSE, 1)[1] if THINK_CLOSE in completion else ""


def _text(completion) -> str:
    """TRL passes a string for a text prompt, or [{"role": "assistant", "content": ...}] for a conversation."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _cut_off(ids) -> bool:
    return ids is not None and (not ids or ids[-1] not in END_OF_REPLY_IDS)


def correct_reward(completions, answer, completion_ids=None, log_metric=None, **kwargs) -> list[float]:
    """1.0 when the answer after </think> is the right letter (the exact set of letters for a multiple-answer
    question), else 0.0: also when nothing is readable, or the reply was cut off. `answer` is the dataset column
    of right letters ("C", or "AC").

    >>> correct_reward(["<think>\\n心率正常范围\\n</think>\\n\\n答案：A"], answer=["A"])
    [1.0]
    >>> correct_reward(["<think>\\n答案：A\\n</think>\\n\\n答案：ABCDE"], answer=["A"])  # every letter; in the think only
    [0.0]
    """
    ids = completion_ids or [None] * len(completions)
    texts = [_text(c) for c in completions]
    scores = [0.0 if _cut_off(i) else float(is_correct(t, a)) for t, a, i in zip(texts, answer, ids)]
    if log_metric is not None:  # TRL: averaged into each logging step's record beside the rewards
        log_metric("unparsed", sum(read_answer(t) is None for t in texts) / max(1, len(texts)))
    return scores


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 for Qwen3's native shape: one non-empty <think>...</think> at the start, then an answer that states
    its letter ("答案：X"); else 0.0. No <answer> tags are asked for.

    >>> format_reward(["<think>\\n先看病史。\\n</think>\\n\\n综上，答案：B", "<think>\\n\\n</think>\\n\\n答案：B"])
    [1.0, 0.0]
    """
    scores = []
    for completion in map(_text, completions):
        text = completion.lstrip()
        shaped = (text.startswith(THINK_OPEN) and text.count(THINK_OPEN) == 1 and text.count(THINK_CLOSE) == 1
                  and bool(text[len(THINK_OPEN):text.index(THINK_CLOSE)].strip())
                  and bool(_ANSWER_STATEMENT.search(answer_part(text))))
        scores.append(float(shaped))
    return scores


def language_reward(completions, **kwargs) -> list[float]:
    """The Chinese share of the answer after </think>: Han characters / (Han characters + letters of Latin words;
    lone option letters are not counted). 0.0 for an empty answer.

    >>> language_reward(["<think>\\n想\\n</think>\\n\\n答案：B", "<think>\\n想\\n</think>\\n\\nanswer B"])
    [1.0, 0.0]
    """
    scores = []
    for completion in map(_text, completions):
        answer = answer_part(completion)
        han = len(_HAN.findall(answer))
        latin = sum(len(word) for word in _LATIN_WORD.findall(answer))
        scores.append(han / (han + latin) if han + latin else 0.0)
    return scores


def make_think_budget_reward(budget: int, max_completion_length: int):
    """The think-budget reward for a run's THINK_BUDGET and MAX_COMPLETION_LENGTH (TRL names it think_budget_reward)."""

    def think_budget_reward(completions, completion_ids, **kwargs) -> list[float]:
        """1.0 while the think (the tokens before </think>) is at most `budget` tokens, then falling linearly to
        0.0 at max_completion_length, where the answer would be cut off; a reply with no </think> has thought
        through all its tokens.

        With budget 4 and max_completion_length 8: a 2-token think scores 1.0, a 6-token think 0.5.
        """
        scores = []
        for ids in completion_ids:
            think = ids.index(THINK_END_ID) if THINK_END_ID in ids else max_completion_length
            over = max(0, think - budget)
            scores.append(max(0.0, 1.0 - over / max(1, max_completion_length - budget)))
        return scores

    return think_budget_reward


def reward_functions(think_budget: int, max_completion_length: int) -> tuple[list, list[float]]:
    """(the reward functions, their weights), in the order GRPOConfig.reward_weights takes them."""
    functions = [correct_reward, format_reward, language_reward,
                 make_think_budget_reward(think_budget, max_completion_length)]
    return functions, [CORRECT_WEIGHT, FORMAT_WEIGHT, LANGUAGE_WEIGHT, THINK_BUDGET_WEIGHT]

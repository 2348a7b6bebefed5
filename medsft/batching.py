"""Batches for training and evaluation: padded to the longest, or packed without padding.

Packing puts a micro-batch's examples in one row with restarting position_ids. transformers turns those
into a block-diagonal causal mask (sdpa, eager and flash alike) as long as no KV cache is used, so packed
examples never see each other and the loss equals the padded one (tests/test_training.py checks this).
"""
import torch

from medsft.chat_format import IGNORE_INDEX

THINK, ANSWER, NO_THINK = 1, 2, 3  # values of "segments": which part of the reply a label belongs to


def segments_of(example: dict) -> list[int]:
    """1 for trained tokens up to and including </think>, 2 for the answer and end token, 0 elsewhere; a reply
    without reasoning (empty think) is 3 throughout: its empty think block, answer and end token."""
    if example.get("no_think"):
        return [0 if label == IGNORE_INDEX else NO_THINK for label in example["labels"]]
    return [0 if label == IGNORE_INDEX else (THINK if i <= example["think_end"] else ANSWER)
            for i, label in enumerate(example["labels"])]


def collate(examples: list[dict], pad_id: int, packing: bool, pad_to_multiple_of: int = 8) -> dict:
    if packing:
        return {
            "input_ids": torch.tensor([[t for e in examples for t in e["input_ids"]]]),
            "labels": torch.tensor([[t for e in examples for t in e["labels"]]]),
            "position_ids": torch.tensor([[p for e in examples for p in range(len(e["input_ids"]))]]),
            "segments": torch.tensor([[s for e in examples for s in segments_of(e)]]),
        }
    longest = max(len(e["input_ids"]) for e in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = {"input_ids": [], "labels": [], "attention_mask": [], "segments": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["labels"].append(e["labels"] + [IGNORE_INDEX] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["segments"].append(segments_of(e) + [0] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


class Collator:
    """A picklable collate_fn for the Trainer's DataLoader."""

    def __init__(self, pad_id: int, packing: bool):
        self.pad_id, self.packing = pad_id, packing

    def __call__(self, examples):
        return collate(examples, self.pad_id, self.packing)

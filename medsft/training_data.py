"""Step 2 of the training scripts: the checked train/val rows, tokenised into examples (one per reply of a
conversation), their length statistics, and the dry run's preview of what is trained."""
import math
from dataclasses import dataclass, field
from pathlib import Path

from medsft.chat_format import IGNORE_INDEX, build_row_example, has_own_system_prompt
from medsft.errors import DataError, UserError
from medsft.records import read_jsonl


@dataclass
class TrainingData:
    train_rows: list
    val_rows: list
    train_set: object  # a list of examples, NoThinkMix (NO_THINK_FRACTION > 0) or v3's MaskedQuestionDataset
    val_set: list
    stats: dict = field(default_factory=dict)


def tokenize_rows(tokenizer, rows, cfg) -> tuple[list, list, dict]:
    """(examples, the rows they came from, how many were shortened (think cut) or dropped for MAX_LENGTH).

    A conversation gives one example per assistant reply; its row here is the conversation up to that reply.
    """
    from medsft.schemas import expand_conversation

    examples, kept, shortened, dropped = [], [], 0, 0
    for row in (part for whole in rows for part in expand_conversation(whole)):
        example = build_row_example(tokenizer, row, cfg.MAX_LENGTH, cfg.SYSTEM_PROMPT)
        if example is not None and example["think_cut"] and cfg.LONG_EXAMPLES == "drop":
            example = None
        if example is None:
            dropped += 1
            continue
        shortened += example["think_cut"] > 0
        examples.append(example)
        kept.append(row)
    return examples, kept, {"shortened": shortened, "dropped": dropped}


def load_training_data(cfg, tokenizer) -> TrainingData:
    from medsft.dataset_prep import check_row
    from medsft.no_think import NoThinkMix, mix_val_examples

    splits = {}
    for name in ("train", "val"):
        path = Path(cfg.DATA_DIR) / f"{name}.jsonl"
        splits[name] = []
        for line, raw in read_jsonl(path):  # a split written by hand gets the same checks as data.py's
            row, _, problem = check_row(raw)
            if row is None:
                raise DataError(path, line, f"{problem}; run `python data.py --source={path}` to check and clean it")
            splits[name].append(row)
        if not splits[name]:
            raise UserError(f"error: {path} has no rows; run `python data.py` again")
    train, train_rows, train_stats = tokenize_rows(tokenizer, splits["train"], cfg)
    val, val_rows, val_stats = tokenize_rows(tokenizer, splits["val"], cfg)
    if not train or not val:
        raise UserError(f"error: no example fits max_length={cfg.MAX_LENGTH}; raise --max_length")
    lengths = sorted(len(e["input_ids"]) for e in train)
    stats = {
        "train_examples": len(train), "val_examples": len(val),
        "p50": percentile(lengths, 50), "p90": percentile(lengths, 90), "p99": percentile(lengths, 99),
        "max": lengths[-1], "train_tokens": sum(lengths),
        "shortened": train_stats["shortened"] + val_stats["shortened"],
        "dropped": train_stats["dropped"] + val_stats["dropped"],
        "own_system_prompt": sum(map(has_own_system_prompt, splits["train"] + splits["val"])),
        "rows": len(splits["train"]) + len(splits["val"]),
    }
    if cfg.NO_THINK_FRACTION > 0:  # that share of examples is a reply without reasoning, re-drawn each epoch
        return TrainingData(train_rows, val_rows, NoThinkMix(train, train_rows, tokenizer, cfg),
                            mix_val_examples(val, val_rows, tokenizer, cfg), stats)
    return TrainingData(train_rows, val_rows, train, val, stats)


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1)]


def show_data_preview(tokenizer, data: TrainingData, cfg) -> None:
    """Token-length stats, then the first training example of each kind (thinking, without reasoning) verbatim
    and its trained part."""
    s = data.stats
    print(f"train examples {s['train_examples']}, val examples {s['val_examples']}, "
          f"{s['train_tokens']:,} train tokens per epoch")
    print(f"example length in tokens: p50 {s['p50']}, p90 {s['p90']}, p99 {s['p99']}, max {s['max']} "
          f"(max_length {cfg.MAX_LENGTH}: {s['shortened']} shortened, {s['dropped']} dropped)")
    print(f"rows with their own system prompt: {s['own_system_prompt']} of {s['rows']} (the rest use system_prompt; "
          "a row's instruction, or a conversation's system turn, wins)")
    no_think = [is_no_think(data.train_set, i) for i in range(len(data.train_set))]
    print(f"examples without reasoning (no-think) in epoch 1: {sum(no_think)} of {len(no_think)} "
          f"(no_think_fraction {cfg.NO_THINK_FRACTION} of them re-drawn each epoch, plus rows with an empty think)")
    # a conversation shows its last reply: the whole conversation as trained, earlier replies without their think
    last = max(i for i, row in enumerate(data.train_rows[:1000]) if row.get("id") == data.train_rows[0].get("id"))
    for kind, wanted in (("", False), (" without reasoning (no-think)", True)):
        if wanted in no_think:
            example = data.train_set[last if no_think[last] == wanted else no_think.index(wanted)]
            print(f"==== first training example{kind}, exactly as trained (between the rulers) ====")
            print(tokenizer.decode(example["input_ids"]), end="")
            print("\n==== its trained part (labels != -100) ====")
            print(tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"])
                                    if label != IGNORE_INDEX]), end="")
            print("\n==== end ====", flush=True)


def is_no_think(dataset, index: int) -> bool:
    """Whether the dataset's example `index` is a reply without reasoning in the current epoch."""
    return dataset.is_no_think(index) if hasattr(dataset, "is_no_think") else dataset[index]["no_think"]

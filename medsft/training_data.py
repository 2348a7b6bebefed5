"""Step 2 of the training scripts: the checked train/val rows, tokenised into examples (one per reply of a
conversation), their length statistics, and the dry run's preview of what is trained."""
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsft.chat_format import IGNORE_INDEX, has_own_system_prompt
from medsft.distributed import is_main_process, world_size
from medsft.errors import DataError, UserError
from medsft.records import read_jsonl


@dataclass
class TrainingData:
    train_rows: list
    val_rows: list
    train_set: object  # a list of examples, NoThinkMix (NO_THINK_FRACTION > 0) or v3's MaskedQuestionDataset
    val_set: object  # an ExampleStore (or a list of example dicts)
    stats: dict = field(default_factory=dict)
    train_examples: object = None  # each training row's example as tokenized once (v3 masks its question)


def tokenize_rows(tokenizer, rows, cfg, progress: bool = False, label: str = "tokenizing") -> tuple:
    """(examples, the rows they came from, how many were shortened (think cut) or dropped for MAX_LENGTH).

    A conversation gives one example per assistant reply; its row here is the conversation up to that reply.
    The examples are an ExampleStore: chat_format's example dicts, built in batches by the fast tokenizer.
    """
    from medsft.schemas import expand_conversation
    from medsft.tokenized_examples import tokenize_examples

    parts = [part for whole in rows for part in expand_conversation(whole)]
    examples, kept, counts = tokenize_examples(tokenizer, parts, cfg.MAX_LENGTH, cfg.SYSTEM_PROMPT,
                                               cfg.LONG_EXAMPLES == "drop", progress, label)
    return examples, [parts[i] for i in kept], counts


def read_split(path: Path) -> list[dict]:
    """A split file's rows, each with the same checks as data.py's."""
    from medsft.dataset_prep import check_row

    rows = []
    for line, raw in read_jsonl(path):  # a split written by hand gets the same checks as data.py's
        row, _, problem = check_row(raw)
        if row is None:
            raise DataError(path, line, f"{problem}; run `python data.py --source={path}` to check and clean it")
        rows.append(row)
    if not rows:
        raise UserError(f"error: {path} has no rows; run `python data.py` again")
    return rows


def load_training_data(cfg, tokenizer) -> TrainingData:
    """The checked splits, each example tokenized once: read from the cache beside the data when nothing that
    changes the examples has changed, else built (on the main process only, under several) and cached."""
    from medsft import tokenized_examples as te
    from medsft.no_think import NoThinkMix, mix_val_examples
    from medsft.schemas import expand_conversation

    start = time.perf_counter()
    files = [Path(cfg.DATA_DIR) / f"{name}.jsonl" for name in ("train", "val")]
    for path in files:
        if not path.is_file():
            raise UserError(f"error: {path}: not found; run `python data.py` first")
    parts = te.cache_parts(cfg, tokenizer, files)
    path = te.cache_path(cfg, parts)
    folder_writable = te.writable(te.cache_folder(cfg))
    if not path.is_file() and not is_main_process() and world_size() > 1 and folder_writable:
        te.wait_for_cache(path)  # the main process builds it
    arrays, splits = None, None
    if path.is_file():
        try:  # the checked rows too: the split files are byte for byte those they were checked from
            arrays = dict(np.load(path))
            splits = json.loads(path.with_suffix(".rows.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable: built again below
            arrays, splits = None, None
    if splits is None:
        arrays = None
        splits = {path.stem: read_split(path) for path in files}
    expanded = {name: [part for whole in rows for part in expand_conversation(whole)] for name, rows in splits.items()}
    if arrays is not None:
        train, val = te.ExampleStore.from_arrays(arrays, "train_"), te.ExampleStore.from_arrays(arrays, "val_")
        kept = {name: arrays[f"{name}_kept"].tolist() for name in ("train", "val")}
        counts = {"shortened": int(arrays["shortened"]), "dropped": int(arrays["dropped"])}
        source = f"read from the cache {path}"
    else:
        why = te.what_changed(te.cache_folder(cfg), parts)
        train, kept_train, train_counts = te.tokenize_examples(
            tokenizer, expanded["train"], cfg.MAX_LENGTH, cfg.SYSTEM_PROMPT, cfg.LONG_EXAMPLES == "drop",
            progress=is_main_process(), label="tokenizing train")
        val, kept_val, val_counts = te.tokenize_examples(
            tokenizer, expanded["val"], cfg.MAX_LENGTH, cfg.SYSTEM_PROMPT, cfg.LONG_EXAMPLES == "drop")
        if cfg.NO_THINK_FRACTION > 0:  # the val set's fixed draw of replies without reasoning, built once here
            val = te.ExampleStore.from_examples(
                mix_val_examples(val, [expanded["val"][i] for i in kept_val], tokenizer, cfg))
        kept = {"train": kept_train, "val": kept_val}
        counts = {key: train_counts[key] + val_counts[key] for key in ("shortened", "dropped")}
        source = f"tokenized (cache miss: {why})"
        if is_main_process() and folder_writable:
            arrays = {f"{name}_{key}": value for name, store in (("train", train), ("val", val))
                      for key, value in _store_arrays(store).items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".rows.json").write_text(json.dumps(splits, ensure_ascii=False), encoding="utf-8")
            te.write_cache(path, parts, {**arrays, "train_kept": np.asarray(kept_train, np.int64),
                                         "val_kept": np.asarray(kept_val, np.int64), **counts})
            source += f"; cached in {path}"
        elif not folder_writable:
            source += f"; not cached: {te.cache_folder(cfg)} is not writable"
    if path.is_file():
        train.cache_path = path  # v3 keeps its trained-token rows beside it
    train_rows = [expanded["train"][i] for i in kept["train"]]
    val_rows = [expanded["val"][i] for i in kept["val"]]
    if not len(train) or not len(val):
        raise UserError(f"error: no example fits max_length={cfg.MAX_LENGTH}; raise --max_length")
    lengths = np.sort(train.lengths())
    stats = {
        "train_examples": len(train), "val_examples": len(val),
        "p50": percentile(lengths, 50), "p90": percentile(lengths, 90), "p99": percentile(lengths, 99),
        "max": int(lengths[-1]), "train_tokens": int(lengths.sum()), **counts,
        "own_system_prompt": sum(map(has_own_system_prompt, splits["train"] + splits["val"])),
        "rows": len(splits["train"]) + len(splits["val"]),
    }
    seconds = time.perf_counter() - start
    print(f"examples: {len(train):,} train and {len(val):,} val, {source}, in {seconds:.1f} s", flush=True)
    stats |= {"prep_seconds": round(seconds, 2), "cache_hit": arrays is not None and source.startswith("read")}
    if cfg.NO_THINK_FRACTION > 0:  # that share of examples is a reply without reasoning, re-drawn each epoch
        return TrainingData(train_rows, val_rows, NoThinkMix(train, train_rows, tokenizer, cfg), val, stats, train)
    return TrainingData(train_rows, val_rows, train, val, stats, train)


def _store_arrays(store) -> dict:
    return {"ids": store.ids, "offsets": store.offsets, **{f"meta_{k}": v for k, v in store.meta.items()}}


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    return int(sorted_values[min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1)])


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
    return bool(dataset.is_no_think(index) if hasattr(dataset, "is_no_think") else dataset[index]["no_think"])

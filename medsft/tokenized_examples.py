"""Each example tokenized once per run, in Rust and in batches, and cached between runs.

A row becomes its token ids once: the whole example's text (the chat template around the row's contents) goes
through the fast tokenizer's batch call, which splits at the template's added tokens and tokenizes the plain text
between them on every core. That gives exactly chat_format's ids whenever no content holds an added token's text
(the contents are plain text there, so a typed "<think>" is not the control token): such rows, and rows longer
than MAX_LENGTH (their think is cut), go through chat_format's own builder instead. `split_special_tokens=True`
alone would not do: Qwen3's <think> and </think> are added tokens that are not "special", so the tokenizer
still matches them in user text.

The examples live in one flat int32 array (ids) with per-example marks (where the prompt ends, the </think>, the
reply's <|im_end|>), so 100k examples of 800 tokens take 320 MB rather than gigabytes of Python lists; labels
and segments follow from the marks. Everything after reads them: the training and val sets, v3's draws (only the
question's piece is re-tokenized), the trained-token rows, the dry run's statistics and the memory estimate.

The cache is a file beside the data, DATA_DIR/.cache/examples-<key>.npz, keyed by a hash of everything that
changes the examples (the split files, the tokenizer and its template, MAX_LENGTH, LONG_EXAMPLES, SYSTEM_PROMPT,
NO_THINK_FRACTION, v3's masking settings and lexicon, the cache format). Under torchrun or accelerate launch the
main process builds it and the others wait for it.
"""
import gc
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from medsft.chat_format import (END_OF_TURN, IGNORE_INDEX, _Marked, _marked_reply,
                                _render_prompt, build_row_example, row_system_prompt, split_conversation)

CACHE_FORMAT = 1  # bump when the stored layout or the way examples are built changes
CHUNK = 1024  # rows per batch call: the progress bar's step, and a bound on the Python lists alive at once
KEEP_CACHES = 3  # the newest cache files kept in DATA_DIR/.cache; older ones are removed
_META = ("prompt_len", "think_end", "end", "think_cut", "no_think", "turns_dropped")


class ExampleStore:
    """Tokenized examples as a sequence of chat_format's example dicts (input_ids, labels, think_end, think_cut,
    no_think, and turns_dropped for a conversation's), stored flat."""

    cache_path = None  # the cache file they were read from or written to, if any

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, meta: dict):
        self.ids, self.offsets, self.meta = ids, offsets, meta

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, index: int) -> int:
        return int(self.offsets[index + 1] - self.offsets[index])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def trained_counts(self) -> np.ndarray:
        """Positions with a label, per example: the reply and its <|im_end|>."""
        return self.meta["end"] - self.meta["prompt_len"] + 1

    def token_set(self) -> set[int]:
        """Every token id of the examples (a count per vocabulary id: linear, no sort of the whole array)."""
        return set(np.flatnonzero(np.bincount(self.ids)).tolist()) if len(self.ids) else set()

    def prompt_ids(self, index: int) -> list[int]:
        start = self.offsets[index]
        return self.ids[start : start + self.meta["prompt_len"][index]].tolist()

    def is_no_think(self, index: int) -> bool:
        return bool(self.meta["no_think"][index])

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        ids = self.ids[self.offsets[index] : self.offsets[index + 1]].tolist()
        prompt_len, end = int(self.meta["prompt_len"][index]), int(self.meta["end"][index])
        labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len : end + 1] + [IGNORE_INDEX] * (len(ids) - end - 1)
        example = {"input_ids": ids, "labels": labels, "think_end": int(self.meta["think_end"][index]),
                   "no_think": bool(self.meta["no_think"][index]), "think_cut": int(self.meta["think_cut"][index])}
        dropped = int(self.meta["turns_dropped"][index])
        return example if dropped < 0 else example | {"turns_dropped": dropped}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @classmethod
    def from_examples(cls, examples) -> "ExampleStore":
        builder = _StoreBuilder()
        for example in examples:
            builder.add_example(example)
        return builder.build()

    def save(self, path: Path, **extra) -> None:
        np.savez(path, ids=self.ids, offsets=self.offsets, **{f"meta_{k}": v for k, v in self.meta.items()}, **extra)

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "ExampleStore":
        return cls(arrays[f"{prefix}ids"], arrays[f"{prefix}offsets"],
                   {k: arrays[f"{prefix}meta_{k}"] for k in _META})


class _StoreBuilder:
    def __init__(self):
        self.chunks, self.lengths, self.meta = [], [], {k: [] for k in _META}

    def add(self, ids, prompt_len, think_end, end, think_cut, no_think, turns_dropped) -> None:
        self.chunks.append(np.asarray(ids, dtype=np.int32))
        self.lengths.append(len(ids))
        for key, value in zip(_META, (prompt_len, think_end, end, think_cut, no_think, turns_dropped)):
            self.meta[key].append(value)

    def add_example(self, example: dict) -> None:
        labels = example["labels"]
        trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        self.add(example["input_ids"], trained[0], example["think_end"], trained[-1], example.get("think_cut", 0),
                 example["no_think"], example.get("turns_dropped", -1))

    def build(self) -> ExampleStore:
        ids = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int32)
        offsets = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        meta = {k: np.asarray(v, dtype=bool if k == "no_think" else np.int32) for k, v in self.meta.items()}
        return ExampleStore(ids, offsets, meta)


# ---------------------------------------------------------------------------------------------------------
# building: the whole example's text through the fast tokenizer's batch call


def example_text(tokenizer, row: dict, system_prompt: str) -> _Marked:
    """The whole training text of a split row (a single-turn row, or a conversation ending with the trained
    reply, with none of its turns dropped), with its plain spans marked."""
    if "messages" in row:
        system, question, history = split_conversation(row["messages"], system_prompt)
        reply = row["messages"][-1]
        think, answer = reply["think"], reply["content"]
    else:
        system, question, history = row_system_prompt(row, system_prompt), row["question"], ()
        think, answer = row["think"], row["answer"]
    prompt = _render_prompt(tokenizer, question, system, history)
    return _Marked().add(prompt).add(_marked_reply(think, answer)).add(END_OF_TURN + "\n")


class _Marks:
    def __init__(self, tokenizer):
        convert = tokenizer.convert_tokens_to_ids
        self.think, self.think_end, self.end = convert("<think>"), convert("</think>"), convert(END_OF_TURN)
        self.start = convert("<|im_start|>")


def marks_of(ids: list[int], marks: _Marks) -> tuple[int, int, int]:
    """(prompt length, index of the reply's </think>, index of the reply's <|im_end|>) of a fast-path example:
    its contents hold no added token, so the first <think> id starts the reply."""
    prompt_len = ids.index(marks.think)
    return prompt_len, ids.index(marks.think_end, prompt_len), len(ids) - 1 - ids[::-1].index(marks.end)


def tokenize_examples(tokenizer, rows: list[dict], max_length: int, system_prompt: str, drop_long: bool = False,
                      progress: bool = False, label: str = "tokenizing") -> tuple[ExampleStore, list[int], dict]:
    """(the examples, the indices of the rows they came from, {"shortened", "dropped"}) for split rows: the same
    examples as chat_format.build_row_example gives row by row, built in batches."""
    from tqdm.auto import tqdm

    gc.freeze()  # the rows read so far are never garbage: the collector stops rescanning them on every pass
    try:
        return _tokenize_examples(tokenizer, rows, max_length, system_prompt, drop_long,
                                  tqdm(total=len(rows), desc=label, unit=" rows", disable=not progress,
                                       mininterval=1.0, smoothing=0.1))
    finally:
        gc.unfreeze()


def _tokenize_examples(tokenizer, rows, max_length, system_prompt, drop_long, bar):
    backend, marks = tokenizer.backend_tokenizer, _Marks(tokenizer)
    builder, kept, shortened, dropped = _StoreBuilder(), [], 0, 0
    for first in range(0, len(rows), CHUNK):
        chunk = rows[first : first + CHUNK]
        texts, fast = [], []
        for i, row in enumerate(chunk):
            marked = example_text(tokenizer, row, system_prompt)
            if marked.ordinary(tokenizer):
                texts.append(marked.text)
                fast.append(i)
        encoded = dict(zip(fast, (e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False))))
        for i, row in enumerate(chunk):
            ids = encoded.get(i)
            if ids is not None and len(ids) <= max_length:
                builder.add(ids, *marks_of(ids, marks), 0, not _reply_think(row), 0 if "messages" in row else -1)
                kept.append(first + i)
                continue
            example = build_row_example(tokenizer, row, max_length, system_prompt)  # cut think, or control text
            if example is None or (drop_long and example["think_cut"]):
                dropped += 1
                continue
            shortened += example["think_cut"] > 0
            builder.add_example(example)
            kept.append(first + i)
        bar.update(len(chunk))
    bar.close()
    return builder.build(), kept, {"shortened": shortened, "dropped": dropped}


def _reply_think(row: dict) -> str:
    return row["messages"][-1]["think"] if "messages" in row else row["think"]


def encode_pieces(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of texts that hold no added token's text (e.g. a masked question's turn), in one batch call."""
    return [e.ids for e in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------------------
# the cache beside the data


def cache_parts(cfg, tokenizer, data_files: list[Path]) -> dict:
    """Everything that changes the examples, each as a short string (the cache key is their hash)."""
    def digest(*chunks) -> str:
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(chunk if isinstance(chunk, bytes) else str(chunk).encode("utf-8"))
        return h.hexdigest()[:16]

    parts = {"format": str(CACHE_FORMAT)}
    for path in data_files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        parts[f"data:{Path(path).name}"] = h.hexdigest()[:16]
    if "_medsft_digest" not in tokenizer.__dict__:  # the vocabulary, merges and added tokens: hashed once per load
        tokenizer.__dict__["_medsft_digest"] = digest(tokenizer.backend_tokenizer.to_str())
    parts["tokenizer"] = tokenizer.__dict__["_medsft_digest"]
    parts["chat_template"] = digest(tokenizer.chat_template or "")
    for name in ("MAX_LENGTH", "LONG_EXAMPLES", "SYSTEM_PROMPT", "NO_THINK_FRACTION"):
        parts[name.lower()] = str(getattr(cfg, name))
    if hasattr(cfg, "MASK_PROB"):  # v3: the masked variants (trained-token rows) depend on these
        for name in ("MASK_PROB", "MASK_STYLE", "MASK_POLICY"):
            parts[name.lower()] = str(getattr(cfg, name))
        lexicon = Path(cfg.LEXICON_PATH)
        parts["lexicon"] = digest(lexicon.read_bytes()) if lexicon.is_file() else "missing"
    return parts


def cache_folder(cfg) -> Path:
    return Path(cfg.DATA_DIR) / ".cache"


def cache_path(cfg, parts: dict) -> Path:
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:20]
    return cache_folder(cfg) / f"examples-{key}.npz"


def what_changed(folder: Path, parts: dict) -> str:
    """Why the cache missed: the settings that differ from the newest cache in the folder, or that there is none."""
    earlier = sorted((p for p in folder.glob("examples-*.json") if p.suffixes[-2:] != [".rows", ".json"]),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    if not earlier:
        return "no cache yet"
    try:
        old = json.loads(earlier[0].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable cache"
    changed = [name for name in parts if old.get(name) != parts[name]] + [name for name in old if name not in parts]
    shown = [f"{name} {old.get(name)!r} -> {parts.get(name)!r}" if not name.startswith(("data:", "tokenizer", "chat_", "lexicon"))
             else f"{name} changed" for name in changed]
    return "changed since the last cache: " + "; ".join(shown) if shown else "no cache for these settings"


def write_cache(path: Path, parts: dict, arrays: dict) -> None:
    """Atomically: a killed run never leaves a half-written cache that a later run would read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(staging, **arrays)
    path.with_suffix(".json").write_text(json.dumps(parts, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(staging, path)
    for old in sorted(path.parent.glob("examples-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_CACHES:]:
        for stale in (old, old.with_suffix(".json"), old.with_suffix(".tokens.npy"), old.with_suffix(".rows.json")):
            stale.unlink(missing_ok=True)


def wait_for_cache(path: Path, timeout_s: float = 3600.0) -> bool:
    """Another rank waits for the main process's cache file (it appears whole, by rename)."""
    start = time.monotonic()
    while not path.is_file():
        if time.monotonic() - start > timeout_s:
            return False
        time.sleep(0.5)
    return True


def writable(folder: Path) -> bool:
    probe = folder if folder.exists() else folder.parent
    return os.access(probe, os.W_OK)


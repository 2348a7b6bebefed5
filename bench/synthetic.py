"""The benchmark's inputs: a random-weight Qwen3 saved to disk, and synthetic rows in the dataset's shape.

The rows are common Chinese tokens in the dataset's schema, with whole-example token lengths drawn from a
lognormal fitted to the real dataset's p50 and p90, so the recipes see the real dataset's padding and packing.
"""
import json
import math
import random
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare_model(cfg, paths) -> Path:
    """MODEL_DIR, or a random Qwen3 built once in WORK_DIR: the real 1.7B architecture (full) or 2 layers (tiny)."""
    from medsft.tiny_model import build_tiny_qwen3

    if cfg.MODEL_DIR:
        return Path(cfg.MODEL_DIR)
    if cfg.MODE == "full":
        # Qwen3-1.7B: 28 layers, hidden 2048, FFN 6144, 16 heads / 8 KV heads of 128, vocab 151,936, tied
        name, shape = "qwen3-1.7b-random", {"layers": 28, "hidden": 2048, "heads": 16, "kv_heads": 8,
                                             "intermediate": 6144}
    else:
        name, shape = "qwen3-tiny-random", {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128}
    model_dir = paths.work / name
    if (model_dir / "config.json").is_file():
        print(f"using the random model in {model_dir}", flush=True)
        return model_dir
    print(f"building a random-weight Qwen3 ({shape}) in {model_dir} ...", flush=True)
    staging = paths.work / f".{name}.tmp"  # renamed when complete, so a killed build is never reused
    shutil.rmtree(staging, ignore_errors=True)
    import torch

    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1.7B random weights: seconds on a GPU
            build_tiny_qwen3(staging, seed=cfg.SEED, **shape)
    except RuntimeError as e:  # e.g. a GPU without room for it: the CPU takes a minute, but the run goes on
        print(f"building on the GPU failed ({str(e).splitlines()[0][:200]}); building on the CPU", flush=True)
        shutil.rmtree(staging, ignore_errors=True)
        build_tiny_qwen3(staging, seed=cfg.SEED, **shape)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    staging.rename(model_dir)
    return model_dir


def load_bench_tokenizer(model_dir):
    from medsft.model_loading import load_tokenizer

    return load_tokenizer(str(model_dir))


_CJK = re.compile(r"[\u4e00-\u9fff]{1,2}")


def common_cjk_token_ids(tokenizer, count: int = 2000) -> list[int]:
    """The first `count` token ids that decode to 1-2 Chinese characters (low ids are BPE's earliest merges)."""
    ids = []
    for token_id in range(len(tokenizer)):
        if _CJK.fullmatch(tokenizer.decode([token_id])):
            ids.append(token_id)
            if len(ids) == count:
                break
    return ids


def _chinese_text(rng: random.Random, words: list[str], pieces: int) -> str:
    """`pieces` common tokens' text, in clauses of 6-16 with Chinese punctuation and the odd line break."""
    out, clause = [], rng.randint(6, 16)
    for _ in range(max(1, pieces)):
        if clause == 0:
            end = rng.random() < 0.4
            out.append("。" if end else "，")
            if end and rng.random() < 0.3:
                out.append("\n")
            clause = rng.randint(6, 16)
        else:
            out.append(rng.choice(words))
            clause -= 1
    return "".join(out).strip("，\n") + "。"


def build_synthetic_rows(tokenizer, n: int, seed: int = 0, p50: int = 763, p90: int = 996, max_tokens: int = 3150,
                         think_share: float = 0.72, terms=None) -> list[dict]:
    """`n` rows in the dataset's schema whose whole-example token lengths follow a lognormal fitted to p50/p90.

    The text is common Chinese tokens; each question names a medical term (so v3 has terms to mask). The
    tokens-per-piece ratio of re-tokenised text is measured first, so the lengths come out as targeted.
    """
    from medsft.chat_format import SYSTEM_PROMPT, build_training_example

    rng = random.Random(seed)
    words = [tokenizer.decode([i]) for i in common_cjk_token_ids(tokenizer)]
    terms = list(terms) if terms else _lexicon_terms()
    sample = _chinese_text(random.Random(seed + 1), words, 3000)
    tokens_per_piece = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 3000
    minimal = build_training_example(tokenizer, {"question": "问", "think": "想", "answer": "答"}, 10**6)
    overhead = len(minimal["input_ids"]) - 3  # system prompt, chat template, think tags, end token
    sigma = math.log(p90 / p50) / 1.2816  # z of the 90th percentile
    rows = []
    for _ in range(n):
        length = min(max_tokens, max(overhead + 40, round(rng.lognormvariate(math.log(p50), sigma))))
        question = rng.randint(10, 30)
        answer = max(8, round((1 - think_share) * length) - overhead - question)
        think = max(8, length - overhead - question - answer)
        term = rng.choice(terms)
        question_text = _chinese_text(rng, words, round(question / tokens_per_piece)).replace("\n", "")
        rows.append({
            "instruction": SYSTEM_PROMPT,
            "question": "医生，" + term + question_text[:-1] + "？",
            "think": _chinese_text(rng, words, round(think / tokens_per_piece)),
            "answer": _chinese_text(rng, words, round(answer / tokens_per_piece)),
        })
    return rows


def _lexicon_terms() -> list[str]:
    from medsft.masking import load_lexicon

    return sorted(load_lexicon(ROOT / "data" / "medical_terms.tsv"))


def example_length_stats(tokenizer, rows) -> dict:
    """Whole-example token lengths (p50, p90, p99, max) and the think's share of the tokens, as trained."""
    from medsft.chat_format import IGNORE_INDEX, build_training_example
    from medsft.training_data import percentile

    lengths, think = [], 0
    for row in rows:
        example = build_training_example(tokenizer, row, 10**6)
        prompt = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        lengths.append(len(example["input_ids"]))
        think += example["think_end"] + 1 - prompt  # <think> ... </think>
    lengths.sort()
    return {"rows": len(rows), "p50": percentile(lengths, 50), "p90": percentile(lengths, 90),
            "p99": percentile(lengths, 99),
            "max": lengths[-1], "mean": round(sum(lengths) / len(lengths), 1),
            "think_share": round(think / sum(lengths), 4)}


def write_synthetic_data(cfg, tokenizer, data_dir: Path) -> dict:
    """train.jsonl and val.jsonl in data_dir; returns the train rows' length stats."""
    rows = build_synthetic_rows(tokenizer, cfg.TRAIN_ROWS + cfg.VAL_ROWS, cfg.SEED, cfg.LENGTH_P50, cfg.LENGTH_P90,
                                cfg.LENGTH_MAX, cfg.THINK_SHARE)
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:cfg.TRAIN_ROWS]), ("val", rows[cfg.TRAIN_ROWS:])):
        (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                                                encoding="utf-8")
    return example_length_stats(tokenizer, rows[:cfg.TRAIN_ROWS])

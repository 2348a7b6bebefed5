"""Download, check and split the medical R1 dataset (or your own data) into train/val (and test) JSONL.

    python data.py                                   # krisfu/delicate_medical_r1_data from ModelScope
    python data.py --source=data/sample.jsonl        # offline: the bundled 50-row sample
    python data.py --source=my.csv --test_fraction=0.1 --on_bad_row=skip
    python data.py --test_fraction=0.1 --gold_size=100              # + gold.jsonl: the 100 best-rated held-out rows
    python data.py --source=data/examples/medical_o1.json           # other schemas are detected from their keys
    python data.py --source=my.csv --columns=question:Question,think:Complex_CoT,answer:Response
    python data.py --source=data/examples/gradio_seed.jsonl --test_fraction=0.1 --stratify_by=meta.specialty

The split is the originals': the rows as read are shuffled with random.seed(SEED) and cut at int(0.9 n)
(80/10/10 with --test_fraction=0.1: int(0.8 n), int(0.9 n)); only then are bad rows dropped from the split
they fell in, and from train the rows whose question is in val or test or earlier in train. No val row moves.
"""
import hashlib
import json
from collections import Counter
from pathlib import Path

from medsft.dataset_prep import (clean_splits, find_data_files, held_out_duplicates, no_reasoning_replies,
                                 pick_gold_rows, quality_score, read_source, split_as_originals, stratum_of)
from medsft.errors import UserError
from medsft.hub_download import download_dataset
from medsft.records import jsonl_text, write_files_atomically
from medsft.schemas import SCHEMAS, parse_columns
from medsft.settings import check_settings, parse_settings

# -----------------------------------------------------------------------------
# source
SOURCE = "krisfu/delicate_medical_r1_data"  # ModelScope dataset id, or a local .jsonl/.json/.csv/.parquet file or folder
REVISION = ""                               # ModelScope branch or tag to download; "" = the default branch, master
ON_BAD_ROW = "error"                        # "error" stops at bad rows (naming file and line); "skip" drops and counts them
SCHEMA = "auto"                             # "auto" detects it from the keys; or question_think_answer, gradio_seed,
                                            # alpaca, medical_o1, sharegpt, openai
COLUMNS = ""                                # any other layout: "question:Question,think:Complex_CoT,answer:Response"
                                            # (also system:COL, meta:COL; no think = replies without reasoning)
# split
DATA_DIR = "data"                           # writes train.jsonl, val.jsonl (test.jsonl) and manifest.json here
VAL_FRACTION = 0.1                          # 0.1 = the originals' 90/10 split: val.jsonl is exactly their val rows
TEST_FRACTION = 0.0                         # > 0 also writes test.jsonl; 0.1 = the 80/10/10 split of the Gradio project
SEED = 42                                   # the shuffle before splitting
STRATIFY_BY = ""                            # e.g. "meta.specialty": each value's share of val and test within a row
                                            # of its share overall ("" = the originals' split)
GOLD_SIZE = 0                               # > 0 also writes gold.jsonl: the held-out rows with the best quality_f1
# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_settings(globals(), argv)
    cfg.print("data.py settings")
    check_settings([
        cfg.ON_BAD_ROW not in ("error", "skip") and f"on_bad_row must be 'error' or 'skip', not {cfg.ON_BAD_ROW!r}",
        not 0 <= cfg.VAL_FRACTION < 1 and f"val_fraction must be in [0, 1), not {cfg.VAL_FRACTION}",
        not 0 <= cfg.TEST_FRACTION < 1 and f"test_fraction must be in [0, 1), not {cfg.TEST_FRACTION}",
        cfg.VAL_FRACTION + cfg.TEST_FRACTION >= 1 and "val_fraction + test_fraction must be below 1",
        cfg.GOLD_SIZE < 0 and f"gold_size must be 0 (none) or more, not {cfg.GOLD_SIZE}",
        cfg.SCHEMA not in ("auto", *SCHEMAS)
        and f"schema must be auto or one of {', '.join(SCHEMAS)}, not {cfg.SCHEMA!r}",
        cfg.COLUMNS and cfg.SCHEMA != "auto" and "give --schema or --columns, not both",
        *parse_columns(cfg.COLUMNS)[1],
    ])

    # ========== 1. Find the source files (a local file, or a ModelScope download) ==========
    local, revision = Path(cfg.SOURCE).expanduser(), None
    if local.is_dir():
        files = find_data_files(local)
    elif local.exists() or local.suffix or cfg.SOURCE.startswith(("/", ".", "~")):
        files = [local]
    else:
        print(f"downloading {cfg.SOURCE} from ModelScope ...", flush=True)
        folder, revision = download_dataset(cfg.SOURCE, cfg.REVISION)
        files = find_data_files(folder)
    print("reading " + ", ".join(map(str, files)))

    # ========== 2. Read every row through its file's schema (bad rows are kept until after the split) ==========
    read_rows, schemas = read_source(files, cfg.ON_BAD_ROW, cfg.SCHEMA, parse_columns(cfg.COLUMNS)[0])
    for path, schema in schemas.items():
        print(f"{path}: schema {schema}")

    # ========== 3. The originals' split of the rows as read, then bad rows and duplicates dropped by split ==========
    strata = [stratum_of(r.raw, cfg.STRATIFY_BY) for r in read_rows] if cfg.STRATIFY_BY else None
    cut = split_as_originals(read_rows, cfg.VAL_FRACTION, cfg.TEST_FRACTION, cfg.SEED, strata)
    splits, dropped = clean_splits(cut)
    check_nothing_empty(splits, cut, dropped)
    bare, replies = no_reasoning_replies([row for split in splits.values() for row in split])

    # ========== 4. The gold set: the best-rated held-out rows (never train), for evaluate.py ==========
    gold = pick_gold_rows(splits["val"] + splits.get("test", []), cfg.GOLD_SIZE) if cfg.GOLD_SIZE else []

    # ========== 5. Write the splits, gold set, manifest and settings atomically ==========
    out = Path(cfg.DATA_DIR)
    texts = {out / f"{name}.jsonl": jsonl_text(split) for name, split in splits.items()}
    if gold:
        texts[out / "gold.jsonl"] = jsonl_text(gold)
    content = hashlib.sha256("".join(texts[p] for p in sorted(texts)).encode("utf-8")).hexdigest()
    manifest = {
        "source": cfg.SOURCE, **({"source_revision": revision} if revision else {}),
        "source_files": [str(f) for f in files], "schemas": schemas, "rows_read": len(read_rows),
        "counts": {name: len(split) for name, split in splits.items()},
        "dropped": dropped,  # {split: {reason: rows}}: bad rows where they fell, duplicates from train only
        "held_out_duplicates": held_out_duplicates(splits), "replies": replies, "replies_without_reasoning": bare,
        "seed": cfg.SEED, "val_fraction": cfg.VAL_FRACTION, "test_fraction": cfg.TEST_FRACTION,
        "stratify_by": cfg.STRATIFY_BY or None, "content_sha256": content,
    }
    if gold:  # a subset of val and test, ranked by metrics.quality_f1 (ties by id); rows without it last
        manifest["gold"] = {"size": len(gold), "from": sorted(n for n in splits if n != "train"),
                            "ranked_by": "metrics.quality_f1", "unrated": sum(quality_score(r) is None for r in gold),
                            "ids": [row["id"] for row in gold]}
    texts[out / "manifest.json"] = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
    texts[out / "settings.json"] = json.dumps(cfg.as_dict(), ensure_ascii=False, indent=2) + "\n"
    stale = [out / name for name in ("test.jsonl", "gold.jsonl") if out / name not in texts]
    write_files_atomically(texts, remove=stale)

    counts = ", ".join(f"{name} {n}" for name, n in manifest["counts"].items())
    print(f"read {len(read_rows)} rows; wrote {counts}{f', gold {len(gold)}' if gold else ''} to {out}/")
    for split, reasons in dropped.items():
        for reason, n in reasons.items():
            print(f"  dropped {n} {split} rows: {reason}")
    if manifest["held_out_duplicates"]:
        print(f"  note: {manifest['held_out_duplicates']} val/test rows repeat an earlier val/test question "
              "(kept: the held-out splits stay the originals')")
    if bare:
        print(f"  {bare} of {replies} replies have no reasoning: trained as Qwen3 renders a reply without thinking "
              "(an empty <think></think>)")
    return manifest


def check_nothing_empty(splits: dict, cut: dict, dropped: dict) -> None:
    """One line when cleaning emptied a split, with the top reasons."""
    read = sum(map(len, cut.values()))
    for name, rows in splits.items():
        if rows or not cut[name]:
            continue
        reasons = Counter()
        for split in dropped.values():
            reasons.update(split)
        top = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(3))
        if not any(splits.values()):
            raise UserError(f"error: all {read} rows were dropped (top reasons: {top})")
        raise UserError(f"error: {name} is empty after dropping bad rows and duplicates (top reasons: {top}); "
                        "fix the rows or change --val_fraction / --test_fraction")


if __name__ == "__main__":
    main()

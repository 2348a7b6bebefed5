"""Download, check, de-duplicate and split the medical R1 dataset into train/val (and test) JSONL.

    python data.py                                   # krisfu/delicate_medical_r1_data from ModelScope
    python data.py --source=data/sample.jsonl        # offline: the bundled 50-row sample
    python data.py --source=my.csv --test_fraction=0.1 --on_bad_row=skip
    python data.py --test_fraction=0.1 --gold_size=100              # + gold.jsonl: the 100 best-rated held-out rows
"""
import hashlib
import json
from pathlib import Path

from medsft.dataset_prep import (drop_duplicate_questions, find_data_files, load_checked_rows, pick_gold_rows,
                                 quality_score, split_rows)
from medsft.hub_download import download_dataset
from medsft.records import jsonl_text, write_files_atomically
from medsft.settings import check_settings, parse_settings

# -----------------------------------------------------------------------------
# source
SOURCE = "krisfu/delicate_medical_r1_data"  # ModelScope dataset id, or a local .jsonl/.json/.csv/.parquet file or folder
REVISION = ""                               # ModelScope branch or tag to download; "" = the default branch, master
ON_BAD_ROW = "error"                        # "error" stops at bad rows (naming file and line); "skip" drops and counts them
# split
DATA_DIR = "data"                           # writes train.jsonl, val.jsonl (test.jsonl) and manifest.json here
VAL_FRACTION = 0.1                          # 0.1 = the originals' 90/10 split, so val losses stay comparable
TEST_FRACTION = 0.0                         # > 0 also writes test.jsonl
SEED = 42                                   # the shuffle before splitting
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

    # ========== 2. Check every row, then drop duplicate questions ==========
    rows, dropped, read = load_checked_rows(files, cfg.ON_BAD_ROW)
    rows, duplicates = drop_duplicate_questions(rows)
    if duplicates:
        dropped["duplicate_question"] = duplicates

    # ========== 3. Split deterministically ==========
    splits = split_rows(rows, cfg.VAL_FRACTION, cfg.TEST_FRACTION, cfg.SEED)

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
        "source_files": [str(f) for f in files], "rows_read": read,
        "counts": {name: len(split) for name, split in splits.items()},
        "dropped": dict(sorted(dropped.items())), "seed": cfg.SEED,
        "val_fraction": cfg.VAL_FRACTION, "test_fraction": cfg.TEST_FRACTION, "content_sha256": content,
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
    print(f"read {read} rows; wrote {counts}{f', gold {len(gold)}' if gold else ''} to {out}/")
    for reason, n in manifest["dropped"].items():
        print(f"  dropped {n} rows: {reason}")
    return manifest


if __name__ == "__main__":
    main()

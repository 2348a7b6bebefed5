"""Data preparation at scale: the dry run's time against the raw batch tokenization of the same text (CPU).

    python bench/data_prep.py                                   # 10k and 100k rows, v1 and v3 (about 15-30 min)
    python bench/data_prep.py --rows=10000 --versions=v1        # a part of it
    python bench/data_prep.py --rows=2000 --results_path=/tmp/dp.json   # a quick look, results elsewhere

For each size it writes synthetic rows in the dataset's shape (bench/synthetic.py: common Chinese tokens, whole
examples of p50 763 and p90 996 tokens, one lexicon term per question) and, for each version:
- the raw floor: the rows' text (question, think and answer) through the fast tokenizer in one batch call;
- the first dry run (no cache) and a second one (the cache serves it), each `train_loraX.py --dry_run=True` in
  its own process, with its wall time and peak memory (the process's max RSS);
- preparation time = a dry run's wall time less the same dry run on a 10-row data folder (imports, start-up).

The targets (issue 34): first preparation <= 3x the raw floor, cached preparation <= 10% of the first, peak
memory at 100k rows <= 2.5 GB. Results go to RESULTS_PATH (JSON) and a Markdown table beside it, with the machine,
the library versions, the command and the load average before and after each measurement.
"""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/data_prep.py`
    sys.path.insert(0, str(ROOT))

from medsft.settings import parse_settings  # noqa: E402

# -----------------------------------------------------------------------------
ROWS = [10000, 100000]                   # train rows of each synthetic data folder (val gets 10% more)
VERSIONS = ["v1", "v3"]                  # train_lora.py and train_lora3.py (v3: masking, tokens-mode embedding rows)
WORK_DIR = "bench/work/data_prep"        # the tokenizer folder and the synthetic data (reused when already written)
RESULTS_PATH = "bench/results/data_prep/results.json"  # raw figures; the Markdown table beside it (.md)
SEED = 0                                 # synthetic rows
RENDER_ONLY = False                      # True: only rewrite the Markdown table from RESULTS_PATH
# -----------------------------------------------------------------------------

_SCRIPTS = {"v1": "train_lora.py", "v2": "train_lora2.py", "v3": "train_lora3.py"}
# runs a script as __main__ in this process, then reports its peak resident memory: VmHWM, which starts afresh
# with the new program (ru_maxrss would not: Linux keeps the forking parent's peak across fork and exec)
_PEAK = ("import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, '.');"
         "runpy.run_path(sys.argv[0], run_name='__main__');"
         "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'));"
         "print('PEAK_RSS_KB', hwm.split()[1], file=sys.stderr)")


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def make_tokenizer_folder(work: Path) -> Path:
    """A 2-layer random Qwen3 with the real tokenizer: the dry run only needs the tokenizer and the config."""
    from medsft.tiny_model import build_tiny_qwen3

    folder = work / "model"
    if not (folder / "config.json").is_file():
        build_tiny_qwen3(folder)
    return folder


def write_rows(tokenizer, folder: Path, train_rows: int, seed: int) -> Path:
    """train.jsonl and val.jsonl of synthetic rows, written once per size."""
    from bench.synthetic import build_synthetic_rows

    if (folder / "train.jsonl").is_file() and (folder / "val.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rows = build_synthetic_rows(tokenizer, train_rows + max(1, train_rows // 10), seed)
    for name, part in (("train", rows[:train_rows]), ("val", rows[train_rows:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part),
                                              encoding="utf-8")
    return folder


def raw_tokenization(tokenizer, folder: Path) -> dict:
    """The floor: every row's text through the fast tokenizer in one batch call (train and val)."""
    texts = []
    for name in ("train", "val"):
        with open(folder / f"{name}.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts.append("\n".join((row["question"], row["think"], row["answer"])))
    start = time.perf_counter()
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "tokens": sum(map(len, ids)), "texts": len(texts)}


def dry_run(version: str, model: Path, data: Path, out: Path) -> dict:
    """One dry run in its own process: wall time, peak RSS, and the preparation line it printed."""
    command = [sys.executable, "-c", _PEAK, _SCRIPTS[version], "--dry_run=True", f"--model_path={model}",
               f"--data_dir={data}", f"--output_dir={out}", "--report_to=none"]
    load = load_average()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {_SCRIPTS[version]} --dry_run failed:\n{done.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    line = next((l for l in done.stdout.splitlines() if l.startswith("examples: ")), "")
    inside = re.search(r"in ([0-9.]+) s$", line)
    return {"wall_s": round(seconds, 2), "peak_rss_gb": round(peak / 1024**2, 3), "prepared": line,
            "examples_s": float(inside[1]) if inside else None,
            "load_before": load, "load_after": load_average()}


def measure(cfg, version: str, rows: int, model: Path, tokenizer, work: Path) -> dict:
    data = write_rows(tokenizer, work / f"rows-{rows}", rows, cfg.SEED)
    small = write_rows(tokenizer, work / "rows-10", 10, cfg.SEED)
    out = work / "out"
    for folder in (data, small):
        shutil.rmtree(folder / ".cache", ignore_errors=True)
    print(f"{version}, {rows:,} rows: start-up baseline (10 rows) ...", flush=True)
    baseline = dry_run(version, model, small, out)
    print(f"{version}, {rows:,} rows: raw batch tokenization ...", flush=True)
    raw = raw_tokenization(tokenizer, data)
    print(f"{version}, {rows:,} rows: first dry run (no cache) ...", flush=True)
    first = dry_run(version, model, data, out)
    print(f"{version}, {rows:,} rows: second dry run (cached) ...", flush=True)
    cached = dry_run(version, model, data, out)
    prep, prep_cached = first["wall_s"] - baseline["wall_s"], cached["wall_s"] - baseline["wall_s"]
    result = {"version": version, "rows": rows, "tokens": raw["tokens"], "raw_tokenization_s": raw["seconds"],
              "baseline": baseline, "first": first, "cached": cached, "prep_s": round(prep, 2),
              "prep_cached_s": round(prep_cached, 2), "ratio_to_raw": round(prep / raw["seconds"], 2),
              "cached_share": round(prep_cached / prep, 3) if prep > 0 else None}
    print(f"  -> prep {prep:.1f} s ({result['ratio_to_raw']}x raw {raw['seconds']} s), cached {prep_cached:.1f} s, "
          f"peak {first['peak_rss_gb']} GB, load {first['load_before']}", flush=True)
    return result


def machine() -> dict:
    import numpy
    import tokenizers
    import torch
    import transformers

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "tokenizers": tokenizers.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "shared": "the machine ran other jobs at the same time: see each load average"}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Data preparation benchmark ({results['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, CPU only; Python {m['python']}, tokenizers {m['tokenizers']}, "
             f"transformers {m['transformers']}, torch {m['torch']}, numpy {m['numpy']}. {m['shared'].capitalize()}.",
             f"Command: `{results['command']}`", "",
             "Preparation = the dry run's wall time less the same dry run on a 10-row folder. Targets: first <= 3x "
             "the raw batch tokenization, cached <= 10% of the first, peak memory at 100k rows <= 2.5 GB.", "",
             "The 'examples' columns are the time the script itself prints for reading and tokenizing the rows "
             "(load_training_data), first and cached; the rest of a dry run (v3's masking statistics and trained "
             "rows, the memory estimate) is in the preparation time.", "",
             "| version | rows | tokens | raw tokenization | first preparation | ratio | examples, first | cached "
             "preparation | examples, cached | peak memory (first, cached) | load average |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        first, cached = r["first"], r["cached"]
        lines.append(f"| {r['version']} | {r['rows']:,} | {r['tokens']:,} | {r['raw_tokenization_s']} s | {r['prep_s']} s "
                     f"| {r['ratio_to_raw']}x | {first.get('examples_s')} s | {r['prep_cached_s']} s "
                     f"| {cached.get('examples_s')} s | {first['peak_rss_gb']} GB, {cached['peak_rss_gb']} GB "
                     f"| {first['load_before']} |")
    lines += ["", "What each first dry run printed about its examples:", ""]
    lines += [f"- {r['version']}, {r['rows']:,} rows: `{r['first']['prepared']}`; cached: `{r['cached']['prepared']}`"
              for r in results["runs"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    # ========== 1. Settings ==========
    cfg = parse_settings(globals(), argv)
    if cfg.RENDER_ONLY:
        path = Path(cfg.RESULTS_PATH)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text(encoding="utf-8"))), encoding="utf-8")
        return print(f"wrote {path.with_suffix('.md')}")
    cfg.print("data preparation benchmark settings")
    work = Path(cfg.WORK_DIR)
    work.mkdir(parents=True, exist_ok=True)

    # ========== 2. The tokenizer folder and the rows ==========
    from medsft.model_loading import load_tokenizer

    model = make_tokenizer_folder(work)
    tokenizer = load_tokenizer(str(model))

    # ========== 3. Measure each size and version ==========
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
               "command": "python bench/data_prep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "runs": []}
    path = Path(cfg.RESULTS_PATH)
    path.parent.mkdir(parents=True, exist_ok=True)
    for rows in cfg.ROWS:
        for version in cfg.VERSIONS:
            results["runs"].append(measure(cfg, version, int(rows), model, tokenizer, work))
            path.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            path.with_suffix(".md").write_text(markdown(results), encoding="utf-8")

    # ========== 4. Report ==========
    print(markdown(results))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()

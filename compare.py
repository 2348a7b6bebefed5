"""Compare training runs of train_lora.py / train_lora2.py / train_lora3.py.

    python compare.py output/qwen3-1.7b-qlora-v1 output/qwen3-1.7b-qlora-v2 output/qwen3-1.7b-qlora-v3
    python compare.py output/qwen3-1.7b-qlora-v1 output/qwen3-1.7b-qlora-v2 --table_path=v1_v2.md --plot_path=v1_v2.png

Losses compare only between runs on the same data, cut the same way: a warning line names each of those
settings (COMPARED_SETTINGS) on which a run differs from the first one, and that run's row is marked †.
"""
import json
from pathlib import Path

from medsft.console import markdown_table
from medsft.errors import DataError
from medsft.records import read_jsonl
from medsft.settings import check_settings, parse_settings, read_run_settings

# -----------------------------------------------------------------------------
# I/O
RUN_DIRS = []                  # OUTPUT_DIRs of training runs; bare command-line arguments land here
TABLE_PATH = "comparison.md"   # the Markdown table is printed and written here
PLOT_PATH = "comparison.png"   # val/train loss curves overlaid, learning-rate schedules below
# -----------------------------------------------------------------------------

# settings.json entries that change what a loss measures: {name: what the warning calls it}
COMPARED_SETTINGS = {"DATA_SHA256": "data (sha256 of train.jsonl and val.jsonl)", "MAX_LENGTH": "max_length",
                     "LONG_EXAMPLES": "long_examples", "SYSTEM_PROMPT": "system_prompt"}
_DASH = "—"
_HEADER = ["version", "key change", "train loss", "best val loss (step)", "Δ val", "steps", "wall time", "tokens/s",
           "peak mem (GiB)"]
_ALIGN = ["<", "<"] + [">"] * 7


def read_summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"not valid JSON ({e.msg})") from None
    if not isinstance(summary, dict):
        raise DataError(path, None, "expected a JSON object")
    return summary


def read_metrics(path: Path) -> list[dict]:
    """The train and eval records of metrics.jsonl; other records (e.g. the final train_runtime) are skipped."""
    if not path.exists():
        print(f"note: {path} not found, this run has no curves")
        return []
    records = []
    for line_no, record in read_jsonl(path):
        if "loss" not in record and "eval_loss" not in record:
            continue
        if not isinstance(record.get("step"), (int, float)):
            raise DataError(path, line_no, "a loss record needs a numeric 'step'")
        records.append(record)
    return records


def fmt(value, spec: str) -> str:
    return _DASH if value is None else format(value, spec)


def fmt_duration(seconds) -> str:
    if seconds is None:
        return _DASH
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_delta(val_loss, first_val_loss) -> str:
    if val_loss is None or not first_val_loss:
        return _DASH
    return f"{(val_loss - first_val_loss) / first_val_loss * 100:+.1f}%"


def table_row(run: dict, first: dict) -> list[str]:
    s = run["summary"]
    best = fmt(s.get("best_val_loss"), ".4f")
    if s.get("best_step") is not None and best != _DASH:
        best += f" ({s['best_step']})"
    delta = _DASH if run is first else fmt_delta(s.get("best_val_loss"), first["summary"].get("best_val_loss"))
    cells = [run["name"], str(s.get("key_change") or _DASH).replace("|", "\\|"), fmt(s.get("final_train_loss"), ".4f"),
             best, delta, fmt(s.get("steps"), ".0f"), fmt_duration(s.get("wall_time_s")),
             fmt(s.get("train_tokens_per_s"), ",.0f"), fmt(s.get("peak_gpu_mem_gib"), ".1f")]
    return cells


def differing_settings(runs: list[dict]) -> dict[str, list[int]]:
    """{setting: indices of the runs whose settings.json gives it another value than the first run's}; a run
    that records no value for a setting (no settings.json, an older run) is not counted as differing on it."""
    first = runs[0]["settings"]
    differing = {}
    for name in COMPARED_SETTINGS:
        others = [i for i, run in enumerate(runs[1:], start=1)
                  if name in first and name in run["settings"] and run["settings"][name] != first[name]]
        if others:
            differing[name] = others
    return differing


def warn_about_differences(runs: list[dict], differing: dict) -> None:
    for name, others in differing.items():
        values = ", ".join(f"{runs[i]['name']} {_short(runs[i]['settings'][name], name)}" for i in [0, *others])
        print(f"warning: the runs differ in {COMPARED_SETTINGS[name]} ({values}); their losses do not compare "
              "like for like")
    for run in runs:
        if not run["settings"]:
            print(f"note: {run['name']} has no settings.json; its data and settings cannot be checked")


def _short(value, name: str) -> str:
    text = str(value)[:12] if name == "DATA_SHA256" else repr(value)
    return text if len(text) <= 32 else text[:30] + "…'"


def plot_runs(runs: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, sharex=True, figsize=(10, 7), gridspec_kw={"height_ratios": [2, 1]})
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        train = [r for r in run["records"] if "loss" in r]
        evals = [r for r in run["records"] if "eval_loss" in r]
        lrs = [r for r in train if "learning_rate" in r]
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "-o", color=colour,
                         linewidth=2, markersize=4, label=f"{run['name']} val")
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], "--", color=colour,
                         linewidth=1, alpha=0.6, label=f"{run['name']} train")
        if lrs:
            ax_lr.plot([r["step"] for r in lrs], [r["learning_rate"] for r in lrs], color=colour, label=run["name"])
    ax_loss.set(title="Loss per step (solid = validation, dashed = training)", ylabel="loss")
    ax_lr.set(title="Learning-rate schedule", xlabel="step", ylabel="learning rate")
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle("Training runs compared: " + ", ".join(run["name"] for run in runs))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    cfg = parse_settings(globals(), argv, positional="run_dirs")
    # ========== 1. Check the run folders ==========
    run_dirs = [Path(d) for d in cfg.RUN_DIRS]
    check_settings(["no run folders given, e.g. python compare.py output/run-v1 output/run-v2" if not run_dirs else ""]
                   + [f"{d}: no summary.json (is this a training run's OUTPUT_DIR?)"
                      for d in run_dirs if not (d / "summary.json").is_file()])

    # ========== 2. Read summaries and metrics ==========
    runs = []
    for run_dir in run_dirs:
        summary = read_summary(run_dir)
        runs.append({"name": str(summary.get("version") or run_dir.resolve().name), "summary": summary,
                     "records": read_metrics(run_dir / "metrics.jsonl"), "settings": read_run_settings(run_dir)})

    # ========== 3. Table: a run trained on other data or with another cut is marked † ==========
    differing = differing_settings(runs)
    warn_about_differences(runs, differing)
    marked = {i for others in differing.values() for i in others}
    rows = [table_row(run, runs[0]) for run in runs]
    for i in marked:
        rows[i][0] += " †"
    table = markdown_table(_HEADER, rows, _ALIGN) + "\n"
    if marked:
        table += (f"\n† trained on other data or settings than {runs[0]['name']} ("
                  + ", ".join(COMPARED_SETTINGS[name].split(" (")[0] for name in differing) + "): not like for like\n")
    print(table)
    table_path = Path(cfg.TABLE_PATH)
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(table, encoding="utf-8")

    # ========== 4. Plot ==========
    plot_path = Path(cfg.PLOT_PATH)
    plot_runs(runs, plot_path)
    print(f"wrote {table_path} and {plot_path}")


if __name__ == "__main__":
    main()

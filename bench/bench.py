"""Training and inference speed of every recipe, side by side, on one device and the same data.

    python bench/bench.py                                       # = --mode=tiny: a CPU harness check, NOT a benchmark
    python bench/bench.py --mode=tiny --results_dir=/tmp/bench  # keep the tiny results (default: a temp dir)
    python bench/bench.py --mode=full                           # the benchmark, on a CUDA GPU (minutes)
    python bench/bench.py --mode=full --configs=original,v1,bf16_lora --shipped_scripts=False  # a part of it
    python bench/bench.py --render_only=True                    # rebuild bench/RESULTS.md from bench/results/*.json

On the GPU machine of the `device` tool (carry [".whl"], built by ../shared/tools/device-wheels.sh):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site && python bench/bench.py --mode=full --results_dir=$OUT/results

Full mode builds a random-weight Qwen3-1.7B (the real architecture, saved to disk so the scripts' own
from_pretrained and 4-bit loading run) and synthetic rows whose token lengths follow the real dataset, then
trains each config a few steps in its own subprocess (clean peak-memory numbers; an OOM is recorded, not
fatal), measures generation through MedicalAssistant, and runs train_lora3.py and inference_lora.py -b as
shipped. Every number in the results is measured by this run; nothing is looked up or assumed.
"""
import collections
import datetime
import gc
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/bench.py`, Python puts bench/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

from medsft.errors import UserError  # noqa: E402
from medsft.records import read_jsonl  # noqa: E402
from medsft.settings import check_settings, parse_settings  # noqa: E402

# -----------------------------------------------------------------------------
# mode
MODE = "tiny"                       # "tiny": CPU harness check in seconds (not a benchmark); "full": CUDA GPU benchmark
CONFIGS = ["original", "v1", "v2", "v3", "bf16_lora"]  # which of RECIPES (below) to train
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
SHIPPED_SCRIPTS = True              # run train_lora3.py for SCRIPT_STEPS steps, then inference_lora.py -b
SCRIPT_STEPS = 20                   # --max_steps of the train_lora3.py run
SCRIPT_QUESTIONS = 32               # questions answered by inference_lora.py -b
# processes
ISOLATE = "auto"                    # each config in a fresh subprocess: "auto" = in full mode only; "true"; "false"
TIMEOUT_S = 420                     # per subprocess; one that runs over is recorded as failed
# output
RESULTS_DIR = "bench/results"       # <date>-<device>.json goes here (tiny: a temp dir unless given)
RESULTS_MD = "auto"                 # "auto": bench/RESULTS.md for bench/results, else RESULTS.md inside RESULTS_DIR
# internal: full mode runs each config as `bench.py ... --child=train:v1 --child_output=FILE`
CHILD = ""                          # "train:<config>" or "inference"; "" = the whole benchmark
CHILD_OUTPUT = ""                   # the child's result JSON
# -----------------------------------------------------------------------------

# tiny-mode defaults, used unless given on the command line
TINY_MODE = {
    "TRAIN_ROWS": 16, "VAL_ROWS": 4, "LENGTH_P50": 80, "LENGTH_P90": 100, "LENGTH_MAX": 120, "MAX_LENGTH": 128,
    "BATCH_SIZE": 2, "GRADIENT_ACCUMULATION": 1, "WARMUP_STEPS": 1, "STEPS": 1, "MATMUL_SIZE": 512,
    "INFERENCE_BATCH": 4, "INFERENCE_NEW_TOKENS": 8, "SHIPPED_SCRIPTS": False, "SCRIPT_STEPS": 2, "SCRIPT_QUESTIONS": 4,
    "WORK_DIR": "", "RESULTS_DIR": "",  # temp dirs: a harness check never dirties the repo
}
_TINY_NOTE = ("TINY MODE: a harness check on a 2-layer random Qwen3 on CPU. It is NOT a benchmark: "
              "its numbers say nothing about GPU speed or memory.")

# config: (script, overrides of its constants)
RECIPES = {
    # the originals' v1: padded 4 x 4 micro-batches, full-vocabulary logits, everything else as v1
    "original": ("train_lora", {"PACKING": False, "USE_LIGER_KERNEL": False, "BATCH_SIZE": 4,
                                "GRADIENT_ACCUMULATION": 4, "GRADIENT_CHECKPOINTING": True, "LOAD_IN_4BIT": True,
                                "OPTIM": "paged_adamw_8bit"}),
    "v1": ("train_lora", {}),
    "v2": ("train_lora2", {}),
    "v3": ("train_lora3", {}),
    "bf16_lora": ("train_lora", {"LOAD_IN_4BIT": False}),
}
_ADAPTER_CONFIG = "v3"  # its adapter is saved and used for the inference measurement

# the targets the recipes are meant to meet: {label: (config, measure, threshold, "max" or "min")}
TARGETS = {
    "v1 peak reserved memory": ("v1", "peak_reserved_gib", 6.0, "max"),
    "v1 tokens/s vs original": ("v1", "speedup_vs_original", 4.0, "min"),
    "v1 MFU": ("v1", "mfu", 0.25, "min"),
    "bf16_lora MFU": ("bf16_lora", "mfu", 0.35, "min"),
    "full v3 run projection": ("v3", "projected_full_run_s", 300.0, "max"),
}
_TABLE_HEADER = ("| config | tokens/s | step time | peak reserved GiB | peak allocated GiB | MFU | "
                 "speed-up vs original |\n|---|---:|---:|---:|---:|---:|---:|")


def main(argv=None):
    # ========== 1. Settings ==========
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = bench_settings(argv)
    paths = work_paths(cfg)
    if cfg.RENDER_ONLY:
        return {"results_md": write_results_md(cfg)}
    threads = use_one_thread_if_tiny(cfg)
    if cfg.CHILD:
        return run_child(cfg, paths)
    cfg.print(f"bench settings ({cfg.MODE} mode)")
    if cfg.MODE == "tiny":
        print(_TINY_NOTE, flush=True)
    isolate = cfg.ISOLATE.lower() == "true" or (cfg.ISOLATE.lower() == "auto" and cfg.MODE == "full")
    started = datetime.datetime.now().astimezone()

    # ========== 2. Random-weight model and synthetic data in the dataset's shape ==========
    model_dir = prepare_model(cfg, paths)
    tokenizer = load_bench_tokenizer(model_dir)
    data_stats = write_synthetic_data(cfg, tokenizer, paths.data)
    print(f"synthetic data: {cfg.TRAIN_ROWS} train + {cfg.VAL_ROWS} val rows; whole-example tokens p50 "
          f"{data_stats['p50']} (target {cfg.LENGTH_P50}), p90 {data_stats['p90']} (target {cfg.LENGTH_P90}), "
          f"p99 {data_stats['p99']}, max {data_stats['max']}; think share {data_stats['think_share']:.2f} "
          f"(target {cfg.THINK_SHARE})", flush=True)

    # ========== 3. The device's matmul rate, the denominator of MFU ==========
    peak = measure_matmul_rate(cfg.MATMUL_SIZE)
    print(f"measured matmul rate: {_rate(peak['tflops'])} ({peak['dtype']}, {cfg.MATMUL_SIZE}^3)", flush=True)

    # ========== 4. Train each config for WARMUP_STEPS + STEPS steps ==========
    configs = {}
    for name in cfg.CONFIGS:
        print(f"==== training config {name} ====", flush=True)
        configs[name] = (run_in_subprocess(cfg, argv, f"train:{name}", paths) if isolate
                         else run_training_config(cfg, name, model_dir, paths, tokenizer))

    # ========== 5. Generation through MedicalAssistant ==========
    inference = None
    if cfg.INFERENCE:
        print("==== inference ====", flush=True)
        inference = (run_in_subprocess(cfg, argv, "inference", paths) if isolate
                     else measure_inference(cfg, model_dir, paths))

    # ========== 6. The shipped scripts at real size (full mode; tiny mode only if asked) ==========
    scripts = run_shipped_scripts(cfg, model_dir, paths) if cfg.SHIPPED_SCRIPTS else None

    # ========== 7. Results: JSON, RESULTS.md, the targets ==========
    results = {
        "mode": cfg.MODE, "note": _TINY_NOTE if cfg.MODE == "tiny" else None,
        "timestamp": started.isoformat(timespec="seconds"), "date": started.date().isoformat(),
        "device": device_name(), "versions": library_versions(),
        "command": shlex.join(["python", "bench/bench.py", *argv]), "settings": cfg.as_dict(),
        "model": model_summary(model_dir), "data": data_stats, "matmul_rate": peak,
        "configs": configs, "inference": inference, "shipped_scripts": scripts,
    }
    add_derived_figures(results, cfg)
    results_file = write_results(cfg, results)
    results_md = write_results_md(cfg)
    print(render_results(results))
    if cfg.MODE == "tiny":
        print(_TINY_NOTE)
    print(f"wrote {results_file} and {results_md}", flush=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if paths.temporary:
        paths.temporary.cleanup()
    return {"results": results, "results_file": results_file, "results_md": results_md}


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
        *[f"unknown config {name!r}; configs: {', '.join(RECIPES)}" for name in cfg.CONFIGS if name not in RECIPES],
        cfg.STEPS < 1 and f"steps must be at least 1, not {cfg.STEPS}",
        cfg.WARMUP_STEPS < 0 and f"warmup_steps must be 0 or more, not {cfg.WARMUP_STEPS}",
        cfg.TRAIN_ROWS < 1 and "train_rows must be at least 1",
        cfg.VAL_ROWS < 1 and "val_rows must be at least 1",
        not cfg.LENGTH_P50 < cfg.LENGTH_P90 <= cfg.LENGTH_MAX and "need length_p50 < length_p90 <= length_max",
        not 0 < cfg.THINK_SHARE < 1 and f"think_share must be in (0, 1), not {cfg.THINK_SHARE}",
        cfg.INFERENCE_BATCH < 1 and "inference_batch must be at least 1",
        cfg.INFERENCE_NEW_TOKENS < 1 and "inference_new_tokens must be at least 1",
        cfg.MODEL_DIR and not Path(cfg.MODEL_DIR).is_dir() and f"model_dir {cfg.MODEL_DIR}: not a folder",
        cfg.ISOLATE.lower() not in ("auto", "true", "false")
        and f"isolate must be auto, true or false, not {cfg.ISOLATE!r}",
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
    work = Path(temporary.name) if temporary else _from_root(cfg.WORK_DIR)
    return SimpleNamespace(work=work, data=work / "data", runs=work / "runs", adapters=work / "adapters",
                           children=work / "children", temporary=temporary)


def _from_root(path) -> Path:
    """Relative paths are relative to the repository root, wherever the script is started from."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


# ---------------------------------------------------------------------------------------------------------
# 2. model and synthetic data


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
    build_tiny_qwen3(staging, seed=cfg.SEED, **shape)
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
    from medsft.training import percentile

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


# ---------------------------------------------------------------------------------------------------------
# 3. device rate and model size


def _synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_matmul_rate(size: int, repeats: int = 20) -> dict:
    """TFLOP/s of a square matmul: bf16 on the GPU (the rate MFU is measured against), fp32 on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize()
    seconds = time.perf_counter() - start
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return {"tflops": round(2 * size**3 * repeats / seconds / 1e12, 3), "dtype": str(dtype).replace("torch.", ""),
            "size": size, "repeats": repeats}


def matmul_params(config) -> int:
    """N: the weights of q, k, v, o, gate, up and down in every layer, plus lm_head (1.72B for Qwen3-1.7B)."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attention = h * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * h * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + config.vocab_size * h


def model_summary(model_dir) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return {"path": str(model_dir), "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "head_dim": config.head_dim, "vocab": config.vocab_size,
            "tied_embeddings": bool(config.tie_word_embeddings), "matmul_params": matmul_params(config)}


# ---------------------------------------------------------------------------------------------------------
# 4. training


def config_settings(cfg, name: str, model_dir, paths):
    """(Settings, argv): the config's script constants through parse_settings, as its command line would give."""
    import importlib

    script, overrides = RECIPES[name]
    module = importlib.import_module(script)
    values = {"MODEL_PATH": str(model_dir), "DATA_DIR": str(paths.data), "OUTPUT_DIR": str(paths.runs / name),
              "MAX_LENGTH": cfg.MAX_LENGTH, "MAX_STEPS": cfg.WARMUP_STEPS + cfg.STEPS,
              "EVAL_STEPS": 10**6, "SAVE_STEPS": 10**6, "LOG_STEPS": 1, "REPORT_TO": "none", "PROGRESS_BAR": False,
              "RESUME": "never", "OVERWRITE": True}
    if hasattr(module, "LEXICON_PATH"):
        values["LEXICON_PATH"] = str(ROOT / "data" / "medical_terms.tsv")
    values |= overrides
    if cfg.BATCH_SIZE > 0:
        values["BATCH_SIZE"] = cfg.BATCH_SIZE
    if cfg.GRADIENT_ACCUMULATION > 0:
        values["GRADIENT_ACCUMULATION"] = cfg.GRADIENT_ACCUMULATION
    argv = [f"--{k.lower()}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]
    return parse_settings(vars(module), argv), [script + ".py", *argv]


def step_timer(trainer):
    """A TrainerCallback timing every optimizer step (GPU work included) and counting its non-padding tokens.

    It also turns off the evaluation and checkpoint that the Trainer schedules after the last step: the
    benchmark measures training steps, and those would only add wall time.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.start, self.tokens = [], 0.0, 0  # steps: (seconds, tokens) per optimizer step

        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize()
            self.start, self.tokens = time.perf_counter(), trainer.tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize()
            self.steps.append((time.perf_counter() - self.start, trainer.tokens_seen - self.tokens))
            control.should_evaluate = control.should_save = False
            return control

    return StepTimer()


def run_training_config(cfg, name: str, model_dir, paths, tokenizer=None) -> dict:
    """Train one config through the shipped code path; its raw measurements, or what went wrong."""
    import torch

    from medsft.training import build_trainer, check_training_settings, load_lora_model, load_training_data

    settings, argv = config_settings(cfg, name, model_dir, paths)
    shutil.rmtree(settings.OUTPUT_DIR, ignore_errors=True)  # metrics.jsonl and best/ of an earlier bench run
    if name == _ADAPTER_CONFIG:
        shutil.rmtree(paths.adapters / name, ignore_errors=True)  # never measure inference on a stale adapter
    result = {"ok": False, "script": argv[0], "argv": argv[1:], "error": None,
              "effective_batch": settings.BATCH_SIZE * settings.GRADIENT_ACCUMULATION,
              "packing": settings.PACKING, "use_liger_kernel": settings.USE_LIGER_KERNEL,
              "load_in_4bit": settings.LOAD_IN_4BIT, "optim": settings.OPTIM,
              "gradient_checkpointing": settings.GRADIENT_CHECKPOINTING, "modules_to_save": settings.MODULES_TO_SAVE,
              "peak_reserved_gib": None, "peak_allocated_gib": None}
    cuda = torch.cuda.is_available()
    trainer = model = None
    try:
        problems = check_training_settings(settings)
        if hasattr(settings, "MASK_PROB"):
            from medsft.masking import check_masking_settings

            problems += check_masking_settings(settings)
        check_settings(problems)
        tokenizer = tokenizer or load_bench_tokenizer(model_dir)
        data = load_training_data(settings, tokenizer)
        if hasattr(settings, "MASK_PROB"):  # as train_lora3.main: questions masked afresh at every draw
            from medsft.masking import MaskedQuestionDataset

            data.train_set = MaskedQuestionDataset(data.train_rows, tokenizer, settings)
        model = load_lora_model(str(model_dir), settings)
        result["trainable_params"] = model.trainable_params
        trainer = build_trainer(settings, model, tokenizer, data)
        timer = step_timer(trainer)
        trainer.add_callback(timer)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        measured = timer.steps[cfg.WARMUP_STEPS:]
        seconds, tokens = [s for s, _ in measured], sum(t for _, t in measured)
        result |= {
            "ok": True, "step_times_s": [round(s, 4) for s, _ in timer.steps],
            "step_tokens": [t for _, t in timer.steps], "measured_steps": len(measured),
            "median_step_s": round(statistics.median(seconds), 4), "tokens": tokens,
            "tokens_per_s": round(tokens / sum(seconds), 1),
            "losses": [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r],
        }
        if name == _ADAPTER_CONFIG:  # for the inference measurement
            trainer.model.save_pretrained(paths.adapters / name)
    except torch.OutOfMemoryError as e:
        result["error"] = f"out of GPU memory: {str(e).splitlines()[0][:200]}"
    except (Exception, UserError) as e:
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    if cuda:
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    status = (f"{result['tokens_per_s']:,.1f} tokens/s, median step {result['median_step_s']:.3f} s"
              if result["ok"] else f"FAILED: {result['error']}")
    print(f"config {name}: {status}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------
# 5. inference


def measure_inference(cfg, model_dir, paths) -> dict:
    """Generated tokens/s through MedicalAssistant: one question, then INFERENCE_BATCH at once (greedy, full length)."""
    import torch

    from medsft.assistant import MedicalAssistant

    adapter = paths.adapters / _ADAPTER_CONFIG
    result = {"ok": False, "adapter": None, "error": None, "new_tokens": cfg.INFERENCE_NEW_TOKENS,
              "batch": cfg.INFERENCE_BATCH, "peak_reserved_gib": None, "peak_allocated_gib": None}
    try:
        if not (adapter / "adapter_config.json").is_file():
            adapter = fresh_adapter(cfg, model_dir, paths)
        result["adapter"] = str(adapter)
        assistant = MedicalAssistant(str(model_dir), str(adapter))
        questions = [row["question"] for _, row in read_jsonl(paths.data / "val.jsonl")]
        questions = (questions * cfg.INFERENCE_BATCH)[:cfg.INFERENCE_BATCH]
        n = cfg.INFERENCE_NEW_TOKENS
        # min_new_tokens holds the end tokens back, so every reply is exactly n tokens long
        options = {"max_new_tokens": n, "min_new_tokens": n, "temperature": 0.0}
        for warm_up in (questions[:1], questions):  # first calls pay for kernel selection and the allocator
            assistant.ask_batch(warm_up, max_new_tokens=4, min_new_tokens=4, temperature=0.0)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        for mode, batch in (("single", questions[:1]), ("batched", questions)):
            _synchronize()
            start = time.perf_counter()
            replies = assistant.ask_batch(batch, **options) if len(batch) > 1 else [assistant.ask(batch[0], **options)]
            _synchronize()
            seconds = time.perf_counter() - start
            tokens = sum(r.new_tokens for r in replies)
            result[mode] = {"questions": len(batch), "new_tokens": tokens, "seconds": round(seconds, 3),
                            "tokens_per_s": round(tokens / seconds, 1)}
            print(f"inference {mode}: {len(batch)} question(s), {tokens} tokens in {seconds:.2f} s, "
                  f"{tokens / seconds:,.1f} tokens/s", flush=True)
        result["ok"] = True
    except torch.OutOfMemoryError as e:
        result["error"] = f"out of GPU memory: {str(e).splitlines()[0][:200]}"
    except (Exception, UserError) as e:
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        print(f"inference FAILED: {result['error']}", flush=True)
    if torch.cuda.is_available():
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


def fresh_adapter(cfg, model_dir, paths) -> Path:
    """An untrained LoRA adapter with v3's LoRA settings, when the v3 config was not trained (or failed)."""
    from peft import LoraConfig, get_peft_model

    from medsft.model_loading import load_base_model

    settings, _ = config_settings(cfg, _ADAPTER_CONFIG, model_dir, paths)
    lora = LoraConfig(r=settings.LORA_R, lora_alpha=settings.LORA_ALPHA, target_modules=list(settings.TARGET_MODULES),
                      task_type="CAUSAL_LM")
    out = paths.adapters / "fresh"
    get_peft_model(load_base_model(str(model_dir), False), lora).save_pretrained(out)
    print(f"no {_ADAPTER_CONFIG} adapter from this run; measuring with a fresh LoRA adapter ({out})", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# full mode: every config in a fresh process


def run_child(cfg, paths) -> dict:
    """One piece of a full run, in this fresh process; its result goes to CHILD_OUTPUT."""
    model_dir = prepare_model(cfg, paths)
    kind, _, name = cfg.CHILD.partition(":")
    if kind == "train":
        result = run_training_config(cfg, name, model_dir, paths)
    elif kind == "inference":
        result = measure_inference(cfg, model_dir, paths)
    else:
        raise UserError(f"error: unknown --child={cfg.CHILD!r}")
    Path(cfg.CHILD_OUTPUT).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.CHILD_OUTPUT).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return result


def run_logged(cmd: list[str], timeout_s: int, prefix: str = "  ", extra_env: dict | None = None) -> dict:
    """Run a command from the repo root, echoing its output; (return code, seconds, timed out, last lines)."""
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"} | (extra_env or {})
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group: the child and anything it started
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    tail = collections.deque(maxlen=30)
    try:
        for line in proc.stdout:
            print(prefix + line, end="", flush=True)
            tail.append(line.rstrip())
        rc = proc.wait()
    finally:
        timer.cancel()
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "timed_out": timed_out.is_set(),
            "tail": list(tail)}


def run_in_subprocess(cfg, argv: list[str], child: str, paths) -> dict:
    """Run `bench.py --child=...` in a fresh process: clean memory figures, and a crash is recorded, not fatal."""
    output = paths.children / f"{child.replace(':', '-')}.json"
    output.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, f"--mode={cfg.MODE}", f"--work_dir={paths.work}",
           f"--child={child}", f"--child_output={output}"]
    if cfg.MODEL_DIR:
        cmd.append(f"--model_dir={cfg.MODEL_DIR}")
    run = run_logged(cmd, cfg.TIMEOUT_S)
    if output.is_file():
        return json.loads(output.read_text(encoding="utf-8"))
    oom = any("OutOfMemoryError" in line or "out of memory" in line for line in run["tail"])
    reason = (f"timed out after {cfg.TIMEOUT_S} s" if run["timed_out"] else "out of GPU memory" if oom
              else f"exit code {run['rc']}")
    print(f"{child} FAILED: {reason}", flush=True)
    return {"ok": False, "error": f"the subprocess died: {reason}", "output_tail": run["tail"][-12:],
            "peak_reserved_gib": None, "peak_allocated_gib": None}


# ---------------------------------------------------------------------------------------------------------
# 6. the shipped scripts


def run_shipped_scripts(cfg, model_dir, paths) -> dict:
    """train_lora3.py for SCRIPT_STEPS steps, then inference_lora.py -b on SCRIPT_QUESTIONS questions, as shipped."""
    out = paths.runs / "shipped-train_lora3"
    train_cmd = [sys.executable, "train_lora3.py", f"--model_path={model_dir}", f"--data_dir={paths.data}",
                 f"--output_dir={out}", f"--max_steps={cfg.SCRIPT_STEPS}", "--eval_steps=10", "--save_steps=10",
                 "--report_to=none", "--overwrite=True", "--progress_bar=False",
                 "--sample_max_new_tokens=64"]  # the sample answer of a random model is noise; keep it short
    print("==== shipped: train_lora3.py ====", flush=True)
    env = {"OMP_NUM_THREADS": "1", "MEDSFT_QUIET_CPU": "1"} if cfg.MODE == "tiny" else None  # use_one_thread_if_tiny
    run = run_logged(train_cmd, cfg.TIMEOUT_S, extra_env=env)
    summary_file = out / "summary.json"
    train = {"command": shlex.join(["python", *train_cmd[1:]]), "ok": run["rc"] == 0 and summary_file.is_file(),
             "rc": run["rc"], "timed_out": run["timed_out"], "seconds": run["seconds"], "summary": None}
    if summary_file.is_file():
        train["summary"] = json.loads(summary_file.read_text(encoding="utf-8"))
    if not train["ok"]:
        train["output_tail"] = run["tail"][-12:]

    adapter = out / "final" if (out / "final" / "adapter_config.json").is_file() else paths.adapters / _ADAPTER_CONFIG
    questions, predictions = paths.work / "script-questions.jsonl", paths.work / "script-questions.pred.jsonl"
    val = [row for _, row in read_jsonl(paths.data / "val.jsonl")]
    rows = [{"id": f"q{i}", "question": val[i % len(val)]["question"]} for i in range(cfg.SCRIPT_QUESTIONS)]
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    predictions.unlink(missing_ok=True)  # it would resume from an earlier run's answers
    infer_cmd = [sys.executable, "inference_lora.py", f"--model_path={model_dir}", f"--adapter_path={adapter}",
                 f"--batch_file={questions}", f"--output_file={predictions}", f"--batch_size={cfg.INFERENCE_BATCH}",
                 f"--max_new_tokens={cfg.INFERENCE_NEW_TOKENS}"]
    print("==== shipped: inference_lora.py -b ====", flush=True)
    run = run_logged(infer_cmd, cfg.TIMEOUT_S, extra_env=env)
    answered = [row for _, row in read_jsonl(predictions)] if predictions.is_file() else []
    rates = [float(m.group(1)) for line in run["tail"] for m in [re.search(r"([\d.]+) tokens/s", line)] if m]
    infer = {"command": shlex.join(["python", *infer_cmd[1:]]), "ok": run["rc"] == 0 and len(answered) == len(rows),
             "rc": run["rc"], "timed_out": run["timed_out"], "seconds": run["seconds"], "answered": len(answered),
             "new_tokens": sum(r.get("new_tokens", 0) for r in answered),
             "printed_tokens_per_s": rates[-1] if rates else None}
    if not infer["ok"]:
        infer["output_tail"] = run["tail"][-12:]
    return {"train_lora3": train, "inference_lora_batch": infer}


# ---------------------------------------------------------------------------------------------------------
# 7. results


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    import torch

    versions["cuda"] = torch.version.cuda
    return versions


def add_derived_figures(results: dict, cfg) -> None:
    """MFU (4 N FLOPs per trained token against the measured matmul rate), speed-ups, the v3 projection, targets."""
    n, rate = results["model"]["matmul_params"], results["matmul_rate"]["tflops"] * 1e12
    configs = results["configs"]
    original = configs.get("original", {})
    for name, c in configs.items():
        ok = c.get("ok")
        c["mfu"] = round(4 * n * c["tokens_per_s"] / rate, 5) if ok else None
        c["speedup_vs_original"] = (round(c["tokens_per_s"] / original["tokens_per_s"], 3)
                                    if ok and original.get("ok") else None)
        c["projected_full_run_s"] = round(cfg.FULL_RUN_TOKENS / c["tokens_per_s"], 1) if ok else None
        if ok and cfg.MODE == "full" and c["effective_batch"] != 16:
            c["warning"] = f"effective batch {c['effective_batch']}, not 16"
    results["projection"] = {"full_v3_run_tokens": cfg.FULL_RUN_TOKENS,
                             "seconds": configs.get("v3", {}).get("projected_full_run_s"),
                             "note": "training steps only, at the measured v3 rate; no evaluation or checkpoints"}
    results["targets"] = check_targets(configs)


def check_targets(configs: dict) -> list[dict]:
    targets = []
    for label, (name, key, threshold, kind) in TARGETS.items():
        value = configs.get(name, {}).get(key)
        met = None if value is None else (value <= threshold if kind == "max" else value >= threshold)
        targets.append({"target": label, "config": name, "measure": key, "threshold": threshold, "kind": kind,
                        "measured": value, "met": met, "gap": None if value is None else round(value - threshold, 5)})
    return targets


def _results_dir(cfg) -> Path:
    if not cfg.RESULTS_DIR:
        cfg.RESULTS_DIR = tempfile.mkdtemp(prefix="bench-tiny-results-")
    return _from_root(cfg.RESULTS_DIR)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_results(cfg, results: dict) -> Path:
    """RESULTS_DIR/<date>-<device>.json (-2, -3, ... when a run of the same day and device is there)."""
    directory = _results_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    device = "cpu-tiny" if results["mode"] == "tiny" else _slug(results["device"])
    stem = f"{results['date']}-{device}"
    path, n = directory / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}.json"
    path.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path


def results_md_path(cfg) -> Path:
    if cfg.RESULTS_MD != "auto":
        return _from_root(cfg.RESULTS_MD)
    directory = _results_dir(cfg)
    return ROOT / "bench" / "RESULTS.md" if directory.resolve() == (ROOT / "bench" / "results").resolve() \
        else directory / "RESULTS.md"


def write_results_md(cfg) -> Path:
    directory = _results_dir(cfg)
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    path = results_md_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_results_md([json.loads(f.read_text(encoding="utf-8")) | {"file": f.name} for f in files]),
                    encoding="utf-8")
    return path


def render_results_md(all_results: list[dict]) -> str:
    """RESULTS.md: one section per results file, newest first; says so plainly when no GPU run exists."""
    lines = ["# Benchmark results", "",
             "Generated by `python bench/bench.py` from `bench/results/*.json`; do not edit by hand. "
             "What is measured and how: `bench/README.md`.", ""]
    if not any(r.get("mode") == "full" for r in all_results):
        lines += ["**No GPU measurement has been made yet.** There are no numbers here until "
                  "`python bench/bench.py --mode=full` has run on a GPU and its results file is in `bench/results/`.",
                  ""]
    for results in sorted(all_results, key=lambda r: r.get("timestamp", ""), reverse=True):
        lines += [render_results(results), ""]
    return "\n".join(lines).rstrip() + "\n"


def _script_status(run: dict) -> str:
    if run["ok"]:
        return "ok"
    last = next((line.strip() for line in reversed(run.get("output_tail") or []) if line.strip()), "")
    why = "timed out" if run["timed_out"] else f"exit {run['rc']}"
    return f"FAILED ({why}{': ' + last[:200] if last else ''})"


def _rate(tflops: float) -> str:
    return f"{tflops:.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1000:.1f} GFLOP/s"


def _fmt(value, spec: str, suffix: str = "", scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def render_results(results: dict) -> str:
    """One run: a header, the table (one row per config), the targets, inference and the shipped scripts."""
    title = f"## {results['date']}: {results['device']}" + (" (tiny mode: harness check)"
                                                            if results["mode"] == "tiny" else "")
    model, data, versions = results["model"], results["data"], results["versions"]
    lines = [title, ""]
    if results.get("note"):
        lines += [f"> {results['note']}", ""]
    lines += [
        f"- command: `{results['command']}`" + (f" (file `{results['file']}`)" if results.get("file") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- model: random Qwen3, {model['layers']} layers, hidden {model['hidden']}, FFN {model['intermediate']}, "
        f"{model['heads']}/{model['kv_heads']} heads of {model['head_dim']}, vocab {model['vocab']:,}; "
        f"N = {model['matmul_params'] / 1e9:.3f}B matmul parameters",
        f"- data: {data['rows']} synthetic train rows, tokens p50 {data['p50']}, p90 {data['p90']}, p99 {data['p99']}, "
        f"max {data['max']}; think share {data['think_share']:.2f}",
        f"- measured matmul rate: {_rate(results['matmul_rate']['tflops'])} ({results['matmul_rate']['dtype']}); "
        f"{results['settings']['WARMUP_STEPS']} warm-up + {results['settings']['STEPS']} measured steps per config, "
        f"max_length {results['settings']['MAX_LENGTH']}",
        "", _TABLE_HEADER,
    ]
    for name, c in results["configs"].items():
        if not c.get("ok"):
            error = str(c.get("error")).replace("|", "/")
            lines.append(f"| {name} | failed: {error} | | {_fmt(c.get('peak_reserved_gib'), '.2f')} "
                         f"| {_fmt(c.get('peak_allocated_gib'), '.2f')} | | |")
            continue
        lines.append(f"| {name} | {c['tokens_per_s']:,.0f} | {c['median_step_s']:.3f} s "
                     f"| {_fmt(c['peak_reserved_gib'], '.2f')} | {_fmt(c['peak_allocated_gib'], '.2f')} "
                     f"| {_fmt(c['mfu'], '.1f', '%', 100)} | {_fmt(c['speedup_vs_original'], '.2f', 'x')} |")
    notes = [f"- {name}: {c['warning']}" for name, c in results["configs"].items() if c.get("warning")]
    lines += ["", "Notes:", "", *notes] if notes else []
    lines += ["", "Targets:" if results["mode"] != "tiny" else
              "Targets (set for Qwen3-1.7B on a GPU: in tiny mode they only exercise the code, met or not):", ""]
    for t in results["targets"]:
        percent = t["measure"] == "mfu"
        unit = {"peak_reserved_gib": " GiB", "speedup_vs_original": "x", "projected_full_run_s": " s"}[t["measure"]] \
            if not percent else ""
        show = (lambda v: _fmt(v, ".1f", "%", 100)) if percent else (lambda v: _fmt(v, ".2f", unit))
        sign = "<=" if t["kind"] == "max" else ">="
        verdict = "not measured in this run" if t["met"] is None else ("met" if t["met"] else "MISSED")
        measured = "" if t["met"] is None else \
            f" (measured {show(t['measured'])}, gap {'+' if t['gap'] >= 0 else '-'}{show(abs(t['gap']))})"
        lines.append(f"- {t['target']} {sign} {show(t['threshold'])}: {verdict}{measured}")
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
        else:
            lines.append(f"- failed: {inference.get('error')}")
    scripts = results.get("shipped_scripts")
    if scripts:
        train, infer = scripts["train_lora3"], scripts["inference_lora_batch"]
        s = train.get("summary") or {}
        lines += ["", "The shipped scripts at real size:", "",
                  f"- `{train['command']}`: {_script_status(train)}, {train['seconds']:.0f} s in all; summary.json: "
                  f"{s.get('steps')} steps, {_fmt(s.get('train_tokens_per_s'), ',.0f')} tokens/s, peak reserved "
                  f"{_fmt(s.get('peak_gpu_reserved_gib'), '.2f')} GiB, "
                  f"best val loss {_fmt(s.get('best_val_loss'), '.3f')}",
                  f"- `{infer['command']}`: {_script_status(infer)}, {infer['answered']} answered, "
                  f"{infer['new_tokens']:,} new tokens, "
                  f"{_fmt(infer['printed_tokens_per_s'], ',.1f')} tokens/s as printed"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

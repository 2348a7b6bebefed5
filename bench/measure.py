"""One function per measurement: the device's matmul rate, a recipe's training steps, generation, the shipped scripts.

Each returns a plain dict of raw figures (what bench/report.py derives and renders), or what went wrong: an
out-of-memory error or a crash is a result, never the end of the benchmark.
"""
import collections
import gc
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.recipes import ADAPTER_RECIPE, RECIPES, build_recipe_trainer, load_recipe_data, recipe_settings
from bench.synthetic import load_bench_tokenizer
from medsft.errors import UserError
from medsft.records import read_jsonl

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# 1. the device's rate and the model's size


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


def run_gpu_tests(cfg, timeout_s: int) -> dict:
    """`pytest -m gpu` over the test files holding @gpu tests: each test's outcome and time (JUnit XML).

    Each test has GPU_TEST_TIMEOUT_S where pytest-timeout is installed; the whole run has timeout_s.
    On CPU they all skip: the stage then checks only that they are found and collected.
    """
    import importlib.util
    import xml.etree.ElementTree as ElementTree

    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                   if "\n@gpu\n" in f.read_text(encoding="utf-8"))
    report_file = ROOT / cfg.RESULTS_DIR / "gpu-tests.xml"  # beside the results file
    report_file.unlink(missing_ok=True)
    per_test = cfg.GPU_TEST_TIMEOUT_S if importlib.util.find_spec("pytest_timeout") else None
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
           "--continue-on-collection-errors",  # a file that cannot be imported there costs its tests, not the rest
           f"--junitxml={report_file}", *([f"--timeout={per_test}"] if per_test else []), *files]
    print(f"==== GPU tests: {shlex.join(['pytest', *cmd[3:]])} ====", flush=True)
    run = run_logged(cmd, timeout_s)
    tests = []
    if report_file.is_file():
        for case in ElementTree.parse(report_file).iter("testcase"):
            outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            message = (outcome.get("message") or "").strip().splitlines() if outcome is not None else []
            tag = "passed" if outcome is None else outcome.tag
            tests.append({"test": f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}",
                          "outcome": {"failure": "failed"}.get(tag, tag), "seconds": round(float(case.get("time") or 0), 2),
                          "message": message[0][:300] if message else None})
    counts = collections.Counter(t["outcome"] for t in tests)
    result = {"command": shlex.join(["python", *cmd[1:]]), "files": files, "rc": run["rc"],
              "timed_out": run["timed_out"], "seconds": run["seconds"], "per_test_timeout_s": per_test,
              "counts": dict(counts), "tests": tests,
              "ok": bool(tests) and run["rc"] in (0, 5) and not counts["failed"] and not counts["error"]}
    if not result["ok"]:
        result["output_tail"] = run["tail"][-12:]
    print("GPU tests: " + (", ".join(f"{n} {k}" for k, n in counts.items()) or "no result") +
          (f" (timed out after {timeout_s} s)" if run["timed_out"] else ""), flush=True)
    return result


def estimate_peak_memory(settings, model_dir, data, runner: str) -> dict:
    """The training scripts' --dry_run estimate of the training step's peak (medsft/memory_estimate.py), from the
    config and the same data, before the model loads; report.py puts it beside the measured peak."""
    if runner == "trl":
        return {"estimated_peak_gib": None, "estimated_device_total_gib": None,
                "how": "not estimated: the estimate models our scripts, not TRL's"}
    from medsft.memory_estimate import print_memory_estimate

    try:
        estimate = print_memory_estimate(str(model_dir), settings, data)
    except (Exception, UserError) as e:
        return {"estimated_peak_gib": None, "estimated_device_total_gib": None,
                "how": f"the estimate failed: {type(e).__name__}: {str(e)[:200]}"}
    # two figures, each compared with its own measurement (report.py): the torch-visible peak with
    # max_memory_reserved, the device total (+ paged optimizer states + CUDA context) with mem_get_info's used
    return {"estimated_peak_gib": round((estimate.train_peak - estimate.outside_torch) / 2**30, 3),
            "estimated_device_total_gib": round(estimate.train_peak / 2**30, 3),
            "how": "--dry_run's estimate of the training step: torch-visible peak, and device total (with the "
                   "paged optimizer states and the CUDA context)"}


# ---------------------------------------------------------------------------------------------------------
# 2. training


def measure_training(cfg, name: str, model_dir, paths, tokenizer=None) -> dict:
    """Train one recipe for WARMUP_STEPS + STEPS steps; tokens/s, step time and peak memory, or what went wrong."""
    import torch

    cuda = torch.cuda.is_available()
    recipe = RECIPES[name]
    if recipe.needs_cuda and not cuda:
        print(f"config {name}: skipped (needs CUDA)", flush=True)
        return {"ok": None, "runner": recipe.runner, "skipped": "needs a CUDA GPU", "error": None,
                "peak_reserved_gib": None, "peak_allocated_gib": None}
    settings, argv = recipe_settings(cfg, name, model_dir, paths)
    shutil.rmtree(settings.OUTPUT_DIR, ignore_errors=True)  # metrics.jsonl and best/ of an earlier bench run
    if name == ADAPTER_RECIPE:
        shutil.rmtree(paths.adapters / name, ignore_errors=True)  # never measure inference on a stale adapter
    result = {"ok": False, "runner": recipe.runner, "script": argv[0], "argv": argv[1:], "error": None,
              "effective_batch": settings.BATCH_SIZE * settings.GRADIENT_ACCUMULATION,
              "packing": settings.PACKING, "use_liger_kernel": settings.USE_LIGER_KERNEL,
              "load_in_4bit": settings.LOAD_IN_4BIT, "optim": settings.OPTIM,
              "gradient_checkpointing": settings.GRADIENT_CHECKPOINTING,
              "modules_to_save": getattr(settings, "MODULES_TO_SAVE", None),
              "embedding_mode": getattr(settings, "EMBEDDING_MODE", None),
              "peak_reserved_gib": None, "peak_allocated_gib": None, "peak_device_used_gib": None,
              "estimated_peak_gib": None, "estimated_device_total_gib": None, "how": None}
    trainer = timer = None
    try:
        tokenizer = tokenizer or load_bench_tokenizer(model_dir)
        data = load_recipe_data(settings, tokenizer)
        result |= estimate_peak_memory(settings, model_dir, data, recipe.runner)
        trainer = build_recipe_trainer(name, settings, model_dir, tokenizer, data)
        result["trainable_params"] = trainer.model.trainable_params
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
        if name == ADAPTER_RECIPE:  # for the inference measurement
            trainer.model.save_pretrained(paths.adapters / name)
    except torch.OutOfMemoryError as e:
        result["error"] = f"out of GPU memory: {str(e).splitlines()[0][:200]}"
    except (Exception, UserError) as e:
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    if cuda:
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_device_used_gib"] = round(max(getattr(timer, "device_used", 0), _device_used_bytes()) / 2**30, 3)
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    status = (f"{result['tokens_per_s']:,.1f} tokens/s, median step {result['median_step_s']:.3f} s"
              if result["ok"] else f"FAILED: {result['error']}")
    print(f"config {name}: {status}", flush=True)
    return result


def _device_used_bytes() -> int:
    """What the whole GPU holds (torch.cuda.mem_get_info: total - free): torch's reserved memory, the CUDA context
    and a paged optimizer's managed memory, which torch's counters never see; 0 without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def step_timer(trainer):
    """A TrainerCallback timing every optimizer step (GPU work included) and counting its non-padding tokens.

    It also turns off the evaluation and checkpoint that the Trainer schedules after the last step: the
    benchmark measures training steps, and those would only add wall time.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.start, self.tokens = [], 0.0, 0  # steps: (seconds, tokens) per optimizer step
            self.device_used = 0  # the most the whole GPU held at a step's end (mem_get_info), in bytes

        def on_step_begin(self, args, state, control, **kwargs):
            _synchronize()
            self.start, self.tokens = time.perf_counter(), trainer.state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize()
            self.steps.append((time.perf_counter() - self.start, trainer.state.num_input_tokens_seen - self.tokens))
            self.device_used = max(self.device_used, _device_used_bytes())
            control.should_evaluate = control.should_save = False
            return control

    return StepTimer()


# ---------------------------------------------------------------------------------------------------------
# 3. inference


def measure_inference(cfg, model_dir, paths) -> dict:
    """Generated tokens/s through MedicalAssistant: one question, then INFERENCE_BATCH at once (greedy, full length)."""
    import torch

    from medsft.assistant import MedicalAssistant

    adapter = paths.adapters / ADAPTER_RECIPE
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
        result["batch_speedup"] = round(result["batched"]["tokens_per_s"] / result["single"]["tokens_per_s"], 3)
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

    settings, _ = recipe_settings(cfg, ADAPTER_RECIPE, model_dir, paths)
    lora = LoraConfig(r=settings.LORA_R, lora_alpha=settings.LORA_ALPHA, target_modules=list(settings.TARGET_MODULES),
                      task_type="CAUSAL_LM")
    out = paths.adapters / "fresh"
    get_peft_model(load_base_model(str(model_dir), False), lora).save_pretrained(out)
    print(f"no {ADAPTER_RECIPE} adapter from this run; measuring with a fresh LoRA adapter ({out})", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------
# 4. the shipped scripts


def _script_env(cfg) -> dict | None:
    return {"OMP_NUM_THREADS": "1", "MEDSFT_QUIET_CPU": "1"} if cfg.MODE == "tiny" else None  # use_one_thread_if_tiny


def shipped_train_lora3(cfg, model_dir, paths, timeout_s: int) -> dict:
    """train_lora3.py as shipped for SCRIPT_STEPS steps (an evaluation and a checkpoint every 10)."""
    out = paths.runs / "shipped-train_lora3"
    train = run_script(cfg, "train_lora3.py", [
        f"--model_path={model_dir}", f"--data_dir={paths.data}", f"--output_dir={out}",
        f"--max_steps={cfg.SCRIPT_STEPS}", "--eval_steps=10", "--save_steps=10", "--report_to=none",
        "--overwrite=True", "--progress_bar=False",
        "--sample_max_new_tokens=64"], timeout_s, _script_env(cfg))  # a random model's sample is noise: keep it short
    summary_file = out / "summary.json"
    train["summary"] = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else None
    train["ok"] = train["ok"] and train["summary"] is not None
    train.pop("tail")
    return train


def shipped_inference_batch(cfg, model_dir, paths, timeout_s: int) -> dict:
    """inference_lora.py -b on SCRIPT_QUESTIONS questions, with the adapter train_lora3.py wrote."""
    adapter = shipped_adapter(paths)
    questions, predictions = paths.work / "script-questions.jsonl", paths.work / "script-questions.pred.jsonl"
    val = [row for _, row in read_jsonl(paths.data / "val.jsonl")]
    rows = [{"id": f"q{i}", "question": val[i % len(val)]["question"]} for i in range(cfg.SCRIPT_QUESTIONS)]
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    predictions.unlink(missing_ok=True)  # it would resume from an earlier run's answers
    infer = run_script(cfg, "inference_lora.py", [
        f"--model_path={model_dir}", f"--adapter_path={adapter}", f"--batch_file={questions}",
        f"--output_file={predictions}", f"--batch_size={cfg.INFERENCE_BATCH}",
        f"--max_new_tokens={cfg.INFERENCE_NEW_TOKENS}"], timeout_s, _script_env(cfg))
    answered = [row for _, row in read_jsonl(predictions)] if predictions.is_file() else []
    rates = [float(m.group(1)) for line in infer.pop("tail") for m in [re.search(r"([\d.]+) tokens/s", line)] if m]
    return infer | {"ok": infer["ok"] and len(answered) == len(rows), "answered": len(answered),
                    "new_tokens": sum(r.get("new_tokens", 0) for r in answered),
                    "printed_tokens_per_s": rates[-1] if rates else None}


def shipped_merge(cfg, model_dir, paths, timeout_s: int) -> dict:
    """merge_lora.py on that adapter: a plain model folder, checked by the script itself."""
    merged = paths.work / "merged-v3"
    merge = run_script(cfg, "merge_lora.py", [
        f"--adapter_path={shipped_adapter(paths)}", f"--model_path={model_dir}", f"--output_dir={merged}",
        "--overwrite=True", f"--data_dir={paths.data}"], timeout_s, _script_env(cfg))
    merge["ok"] = merge["ok"] and (merged / "config.json").is_file()
    merge["size_gib"] = (round(sum(f.stat().st_size for f in merged.glob("*.safetensors")) / 2**30, 3)
                         if merge["ok"] else None)
    merge.pop("tail")
    return merge


def shipped_adapter(paths) -> Path:
    """The adapter train_lora3.py wrote as shipped; the v3 recipe's when that run failed."""
    final = paths.runs / "shipped-train_lora3" / "final"
    return final if (final / "adapter_config.json").is_file() else paths.adapters / ADAPTER_RECIPE


def run_script(cfg, script: str, args: list[str], timeout_s: int, env=None) -> dict:
    """One shipped script from the repo root: its command, exit code and wall time; the output's end if it failed."""
    cmd = [sys.executable, script, *args]
    print(f"==== shipped: {script} ====", flush=True)
    run = run_logged(cmd, timeout_s, extra_env=env)
    result = {"command": shlex.join(["python", *cmd[1:]]), "ok": run["rc"] == 0, "rc": run["rc"],
              "timed_out": run["timed_out"], "seconds": run["seconds"], "tail": run["tail"]}
    if run["rc"] != 0:
        result["output_tail"] = run["tail"][-12:]
    return result


def measure_streamed_answer(cfg, model_dir, paths, timeout_s: int | None = None) -> dict:
    """The web demo's path without gradio: one model load, one answer streamed by MedicalAssistant.stream and split
    into thinking and answer by ThinkAnswerSplitter, as web_demo.py's chat callback does (greedy).

    In this process (full mode runs it as a child process, under timeout_s)."""
    from medsft.assistant import MedicalAssistant, ThinkAnswerSplitter
    from medsft.chat_format import SYSTEM_PROMPT

    adapter = shipped_adapter(paths)
    result = {"ok": False, "adapter": str(adapter), "error": None}
    try:
        start = time.perf_counter()
        assistant = MedicalAssistant(str(model_dir), str(adapter), False, SYSTEM_PROMPT)
        _synchronize()
        result["load_s"] = round(time.perf_counter() - start, 2)
        question = next(row for _, row in read_jsonl(paths.data / "val.jsonl"))["question"]
        start, pieces, splitter, parts = time.perf_counter(), 0, ThinkAnswerSplitter(), []
        for piece in assistant.stream(question, max_new_tokens=cfg.INFERENCE_NEW_TOKENS, temperature=0.0):
            pieces += 1
            parts += splitter.feed(piece)
        parts += splitter.close()
        _synchronize()
        seconds, reply = time.perf_counter() - start, assistant.last_reply
        result |= {"ok": reply is not None and reply.new_tokens > 0 and pieces > 0,
                   "answer_s": round(seconds, 2), "new_tokens": reply.new_tokens if reply else 0,
                   "streamed_pieces": pieces, "split_parts": len(parts),
                   "tokens_per_s": round(reply.new_tokens / seconds, 1) if reply else None}
    except (Exception, UserError) as e:
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    print(f"streamed answer: {'ok' if result['ok'] else 'FAILED: ' + str(result['error'])}", flush=True)
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


# in the order they run: the training script writes the adapter the others use
SHIPPED_SCRIPTS = {"train_lora3": shipped_train_lora3, "inference_lora_batch": shipped_inference_batch,
                   "merge_lora": shipped_merge, "streamed_answer": measure_streamed_answer}

"""Did fine-tuning help? Exam accuracy of the base model against the fine-tuned one, through lm-evaluation-harness.

    python benchmark.py --exam_dir=exams                                  # medical_zh: CMMLU + C-Eval medical subjects
    python benchmark.py --exam_dir=exams --mode=generate                  # the models think, then answer
    python benchmark.py --exam_file=data/exam_sample.jsonl                # your own questions (JSONL or CMMLU CSV)
    python benchmark.py --exam_file=exams/CMB-val-merge.json,exams/medqa/test.jsonl --sample=500   # the field's exams
    python benchmark.py --finetuned_path=output/qwen3-1.7b-medical-v3 --exam_dir=exams   # a merged or full model
    python benchmark.py --tasks=ceval-valid_physician,cmmlu_anatomy --exam_dir=exams --limit=20

Both models answer the same questions with the same settings in one run: the same precision (bf16, or 4-bit
with LOAD_IN_4BIT), the same chat template, the training run's SYSTEM_PROMPT. The mode is by default the one the
model was trained for: a run with NO_THINK_FRACTION=0 (every example thinks) is scored writing its answer
after thinking (generate), one that also trained without thinking by the likelihood of the answer letter.
The exam table has one row per exam (MedQA-MCMLE, CMB-Exam, CMExam, CMMLU-Med, C-Eval-Med, or your file): each
model's accuracy with its bootstrap 95% interval, the change with its interval, McNemar's exact p-value on the
per-question outcomes and the share of replies with no readable answer. benchmark.json keeps every
per-question outcome, the mode and why it was chosen; benchmark.md the tables; benchmark.png the bars. They
are written beside the fine-tuned run's final/ unless REPORT_PATH says otherwise. The tasks are lm-eval YAML
files in eval_tasks/; the README says where to get each exam set.
"""
import hashlib
import tempfile
import time
from pathlib import Path

from medsft import chat_format
from medsft.assistant import final_folder_hint
from medsft.errors import UserError
from medsft.settings import check_settings, parse_settings, use_run_settings

# -----------------------------------------------------------------------------
# models
FINETUNED_PATH = "output/qwen3-1.7b-qlora-v3/final"  # a LoRA adapter (final/), or a whole model (merge_lora.py, train.py)
MODEL_PATH = "Qwen/Qwen3-1.7B"                       # the base; by default the one FINETUNED_PATH was trained from
LOAD_IN_4BIT = False                                 # both models in 4-bit NF4; False: both in bf16 (fp16 on old GPUs)
ENGINE = "auto"                                      # "auto": vLLM if installed and a GPU is present, else "hf"
                                                     # (transformers); "vllm" is unverified on a GPU so far
# tasks
TASKS = "medical_zh"                                 # a group or subjects of eval_tasks/, or lm-eval task names, comma-separated
EXAM_DIR = ""                                        # the folder with the official CMMLU and C-Eval CSV files (README)
EXAM_FILE = ""                                       # exam files instead of TASKS, comma-separated: CMB-Exam .json,
                                                     # CMExam .csv, MedQA .jsonl, ours (.jsonl) or CMMLU/C-Eval .csv
EXAM_FORMAT = "auto"                                 # auto (from the columns), options, cmmlu, cmb, cmexam or medqa
SAMPLE = 0                                           # > 0: SAMPLE questions per exam, stratified by subject, with SEED
LIMIT = 0                                            # > 0: only the first LIMIT questions of each task, for a quick look
# how the models answer
MODE = "auto"                                        # "auto": as the run trained (NO_THINK_FRACTION=0: generate, else
                                                     # loglikelihood); "loglikelihood": the likeliest letter after an
                                                     # empty think block; "generate": the model writes, letters are read
THINKING = True                                      # generate: think first (Qwen3's thinking mode); False: answer at once
MAX_NEW_TOKENS = 2048                                # generate: reply length limit; a reply cut off counts as wrong
TEMPERATURE = 0.6                                    # generate: Qwen3's thinking sampling (top_p 0.95, top_k 20); 0 = greedy
SYSTEM_PROMPT = chat_format.SYSTEM_PROMPT            # by default the training run's
MAX_LENGTH = 2048                                    # prompt tokens (longer prompts lose their start); by default the run's
BATCH_SIZE = 16                                      # questions (loglikelihood: choices) per forward pass
SEED = 42                                            # the same sampling seed for both models
# output
REPORT_PATH = ""                                     # every number and outcome; benchmark.md and .png beside it;
                                                     # "" = benchmark.json in the run's folder (beside final/)
# -----------------------------------------------------------------------------

_DEMO_ADAPTER = "demo_output/train-v3/final"  # what python demo.py trains: the tiny model's adapter


def main(argv=None):
    from medsft.exam_data import FORMATS
    from medsft.exam_harness import MODES, exam_files, plan_tasks, planned_names

    # ========== 1. Settings (the base, system prompt, length and mode default to the fine-tuned run's) ==========
    cfg = parse_settings(globals(), argv)
    use_demo_adapter(cfg, globals())
    run = use_run_settings(cfg, training_length=True, folder=cfg.FINETUNED_PATH)  # the base, prompt and length trained
    mode_reason = choose_mode(cfg, run)
    if cfg.EXAM_FILE:  # the settings show what will run
        cfg.TASKS, cfg._origins["TASKS"] = planned_names(cfg), "the exam_file tasks"
    report_path = default_report_path(cfg, run)
    cfg.print("benchmark.py settings")
    finetuned = Path(cfg.FINETUNED_PATH)
    check_settings([
        cfg.MODE not in MODES and f"mode must be auto or one of {', '.join(MODES)}, not {cfg.MODE!r}",
        cfg.EXAM_FORMAT not in FORMATS and f"exam_format must be one of {', '.join(FORMATS)}, not {cfg.EXAM_FORMAT!r}",
        cfg.SAMPLE < 0 and "sample must be >= 0",
        cfg.ENGINE not in ("auto", "hf", "vllm") and f"engine must be auto, hf or vllm, not {cfg.ENGINE!r}",
        not cfg.FINETUNED_PATH and "finetuned_path is empty: give the adapter or model folder to compare with the base",
        cfg.FINETUNED_PATH and not finetuned.is_dir() and f"finetuned_path {finetuned}: no such folder (train one "
        "first, e.g. python train_lora3.py, or python demo.py for demo_output/train-v3/final)",
        finetuned.is_dir() and finetuned_kind(finetuned) is None and f"finetuned_path {finetuned}: neither an "
        f"adapter (adapter_config.json) nor a model folder (config.json){final_folder_hint(finetuned)}",
        *[f"exam_file {path}: no such file" for path in exam_files(cfg) if not Path(path).is_file()],
        cfg.EXAM_DIR and not Path(cfg.EXAM_DIR).is_dir() and f"exam_dir {cfg.EXAM_DIR}: no such folder",
        cfg.MAX_NEW_TOKENS < 1 and "max_new_tokens must be at least 1",
        cfg.BATCH_SIZE < 1 and "batch_size must be at least 1",
        cfg.LIMIT < 0 and "limit must be >= 0",
        cfg.TEMPERATURE < 0 and "temperature must be >= 0 (0 = greedy)",
        (report_path.is_dir() or not report_path.parent.is_dir()) and f"report_path {report_path} must be a file "
        "in an existing folder",
    ])

    # ========== 2. Tasks: read and check every exam file, then lm-eval's task folder ==========
    plan, rows = plan_tasks(cfg)

    # ========== 3.-5. Both models over the same tasks, then the paired comparison (run_benchmark) ==========
    with tempfile.TemporaryDirectory(prefix="benchmark-tasks-") as folder:
        report = run_benchmark(cfg, plan, rows, folder)

    # ========== 6. Report: the tables, benchmark.json, benchmark.md, benchmark.png ==========
    from medsft.exam_report import exam_table, report_table

    report |= {"mode_reason": mode_reason, "no_think_fraction": run.get("NO_THINK_FRACTION"),
               "left_out_multiple_answer": plan.left_out, "sample": {"per_exam": cfg.SAMPLE, "seed": cfg.SEED,
                                                                     "drawn": plan.drawn}}
    tables = {"exams": exam_table(report["exams"], plan.left_out), "tasks": report_table(report["tasks"])}
    write_report(report, tables, report_path)
    print(f"\nBy exam:\n{tables['exams']}\n\nBy task:\n{tables['tasks']}\n\n{note_lines(report)}\n"
          f"wrote {report_path}, {report_path.with_suffix('.md')} and {report_path.with_suffix('.png')}")
    return report


def choose_mode(cfg, run: dict) -> str:
    """MODE "auto": the mode the model was trained for; returns why this mode, for the report."""
    fraction = run.get("NO_THINK_FRACTION")
    if cfg.MODE != "auto":
        return "given on the command line" if "MODE" in cfg._given else "set in benchmark.py"
    if run and fraction in (None, 0, 0.0):
        cfg.MODE = "generate"
        why = (f"the run trained with NO_THINK_FRACTION={fraction if fraction is not None else '0 (not in its settings)'}: "
               "every example thinks, so both models think, then answer (scoring it in the no-think rendering "
               "would test a mode it never trained)")
    elif run:
        cfg.MODE = "loglikelihood"
        why = (f"the run trained with NO_THINK_FRACTION={fraction}: it knows the no-think rendering, so the answer "
               "letter's likelihood after an empty think block is fair (and fast)")
    else:
        cfg.MODE = "loglikelihood"
        why = f"no settings.json beside {cfg.FINETUNED_PATH} says how it trained: the letter's likelihood (fast)"
    getattr(cfg, "_origins", {})["MODE"] = "auto: " + why.split(":")[0]  # for cfg.print()
    return why


def default_report_path(cfg, run: dict) -> Path:
    """REPORT_PATH, or benchmark.json in the run's folder (the parent of final/ or best/), or in the run's data
    folder when the model is not in a run's folder."""
    if cfg.REPORT_PATH:
        return Path(cfg.REPORT_PATH)
    finetuned = Path(cfg.FINETUNED_PATH)
    if finetuned.name in ("final", "best") and finetuned.parent.is_dir():
        folder = finetuned.parent
    elif run.get("DATA_DIR") and Path(run["DATA_DIR"]).is_dir():
        folder = Path(run["DATA_DIR"])
    else:
        folder = Path("data") if Path("data").is_dir() else Path(".")
    cfg.REPORT_PATH, cfg._origins["REPORT_PATH"] = str(folder / "benchmark.json"), "the run's folder"
    return folder / "benchmark.json"


def use_demo_adapter(cfg, defaults: dict) -> None:
    """With no trained adapter yet but the demo's, compare that one (a check that the benchmark runs)."""
    if (cfg.FINETUNED_PATH == defaults["FINETUNED_PATH"] and not Path(cfg.FINETUNED_PATH).exists()
            and (Path(_DEMO_ADAPTER) / "adapter_config.json").is_file()):
        print(f"note: {cfg.FINETUNED_PATH} not found; comparing the demo's adapter {_DEMO_ADAPTER} (python demo.py) "
              "with its tiny random base: a check that the benchmark runs, not a medical result")
        cfg.FINETUNED_PATH = _DEMO_ADAPTER


def finetuned_kind(folder: Path) -> str | None:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    return "model" if (folder / "config.json").is_file() else None


def use_vllm(cfg) -> bool:
    import importlib.util

    import torch

    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if cfg.ENGINE == "vllm" and not available:
        raise UserError("error: engine=vllm needs the vllm package and a CUDA GPU; use --engine=hf")
    return cfg.ENGINE == "vllm" or (cfg.ENGINE == "auto" and available)


def run_benchmark(cfg, plan, rows, folder) -> dict:
    from medsft import exam_harness
    from medsft.model_loading import load_tokenizer, resolve_model_path

    exam_harness.write_task_folder(folder, plan, rows, cfg)
    manager = exam_harness.task_manager(folder, plan)
    exam_harness.check_builtin_tasks(manager, plan)
    kind = finetuned_kind(Path(cfg.FINETUNED_PATH))
    base_path = resolve_model_path(cfg.MODEL_PATH)
    tokenizer = load_tokenizer(base_path)
    vllm = use_vllm(cfg)
    engine = "vLLM (unverified: not yet run on a GPU by this project)" if vllm else "transformers"
    how = ("one copy of the base in memory: the base pass, then the adapter attached to it for the fine-tuned pass"
           if kind == "adapter" else "the base pass, then the base freed and the fine-tuned model loaded")
    print(f"engine: {engine}\nmodels: {how}", flush=True)

    # ========== 3. The base model ==========
    results, seconds = {}, {}
    lm, precision = load_base(cfg, base_path, tokenizer, kind, vllm)
    results["base"], seconds["base"] = timed_pass(lm, folder, plan, cfg, manager, "base")

    # ========== 4. The fine-tuned model: the adapter on the same base, or the whole fine-tuned model ==========
    lm = load_finetuned(cfg, lm, tokenizer, kind, vllm)
    results["finetuned"], seconds["finetuned"] = timed_pass(lm, folder, plan, cfg, manager, "fine-tuned")
    del lm

    # ========== 5. Compare: per task, the paired outcomes ==========
    return build_report(cfg, plan, results, tokenizer, engine, how, precision, seconds)


def load_base(cfg, base_path, tokenizer, kind, vllm):
    from medsft import exam_harness
    from medsft.model_loading import compute_dtype, load_base_model

    if vllm:
        adapter = cfg.FINETUNED_PATH if kind == "adapter" else None
        lm = exam_harness.vllm_model(base_path, adapter, cfg)
        lm.finetuned_request, lm.lora_request = lm.lora_request, None  # the base pass: no LoRA
        return lm, "4-bit NF4 (bitsandbytes)" if cfg.LOAD_IN_4BIT else "bfloat16"
    model = load_base_model(base_path, cfg.LOAD_IN_4BIT).eval()
    precision = (f"4-bit NF4, {str(compute_dtype()).removeprefix('torch.')} compute" if cfg.LOAD_IN_4BIT
                 else str(compute_dtype()).removeprefix("torch."))
    return exam_harness.hf_model(model, tokenizer, cfg), precision


def load_finetuned(cfg, lm, tokenizer, kind, vllm):
    from medsft import exam_harness
    from medsft.assistant import attach_adapter
    from medsft.model_loading import load_base_model, resolve_model_path

    if vllm and kind == "adapter":
        lm.lora_request = lm.finetuned_request
        return lm
    if vllm:
        del lm
        return exam_harness.vllm_model(cfg.FINETUNED_PATH, None, cfg)
    if kind == "adapter":
        return exam_harness.hf_model(attach_adapter(lm.model, cfg.FINETUNED_PATH, cfg.MODEL_PATH).eval(), tokenizer, cfg)
    import gc

    del lm
    gc.collect()
    model = load_base_model(resolve_model_path(cfg.FINETUNED_PATH), cfg.LOAD_IN_4BIT).eval()
    return exam_harness.hf_model(model, tokenizer, cfg)


def timed_pass(lm, folder, plan, cfg, manager, label: str):
    from medsft.exam_harness import evaluate

    print(f"---- {label} model: {', '.join(plan.names)} ({cfg.MODE}) ----", flush=True)
    start = time.perf_counter()
    result = evaluate(lm, folder, plan, cfg, manager)
    return result, round(time.perf_counter() - start, 1)


def build_report(cfg, plan, results, tokenizer, engine, how, precision, seconds) -> dict:
    from medsft.exam_harness import chat_template_args
    from medsft.exam_report import compare_task, exam_summaries, group_outcomes, task_outcomes
    from medsft.model_export import library_versions

    def count_tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    base = results["base"]
    prompts = {key: first_prompt(results[key]) for key in results}
    if prompts["base"] != prompts["finetuned"]:
        raise RuntimeError("the two passes rendered different prompts; the comparison would not be fair")
    thinking = chat_template_args(cfg)["enable_thinking"]
    tasks = {}
    for task in base["samples"]:
        sides = {key: task_outcomes(results[key], task, count_tokens, cfg.MAX_NEW_TOKENS,
                                    thinking) for key in results}
        tasks[task] = {"source": plan.ours.get(task, "lm-eval built-in"), "exam": plan.exams.get(task, task),
                       **compare_task(sides["base"], sides["finetuned"], cfg.SEED), **sides}
    for group, members in base.get("group_subtasks", {}).items():
        if members and all(m in tasks for m in members):
            sides = {key: group_outcomes(results[key], group, {m: tasks[m][key] for m in members}) for key in results}
            tasks[group] = {"source": "group", **compare_task(sides["base"], sides["finetuned"], cfg.SEED), **sides}
    template = tokenizer.chat_template or ""
    return {"base": cfg.MODEL_PATH, "finetuned": cfg.FINETUNED_PATH, "engine": engine, "models_in_memory": how,
            "mode": cfg.MODE, "precision": precision, "system_prompt": cfg.SYSTEM_PROMPT,
            "chat_template": {"sha256": hashlib.sha256(template.encode()).hexdigest(), "text": template,
                              "enable_thinking": thinking,
                              "first_prompt": prompts["base"]},
            "libraries": library_versions(("lm_eval", "torch", "transformers", "peft", "vllm")),
            "seconds": seconds, "settings": cfg.as_dict(),
            "exams": exam_summaries(tasks, {t: tasks[t]["exam"] for t in tasks if tasks[t]["source"] != "group"},
                                    cfg.SEED),
            "tasks": tasks}


def first_prompt(result: dict) -> str:
    task = sorted(result["samples"])[0]
    sample = min(result["samples"][task], key=lambda s: s["doc_id"])
    return sample["arguments"][0][0]


def note_lines(report: dict) -> str:
    left_out = sum(report.get("left_out_multiple_answer", {}).values())
    return (f"engine: {report['engine']}; precision: {report['precision']}; mode: {report['mode']} "
            f"({report.get('mode_reason', '')}); seconds: base {report['seconds']['base']}, fine-tuned "
            f"{report['seconds']['finetuned']}\n"
            + (f"{left_out} multiple-answer question(s) left out: one letter's likelihood cannot answer them "
               "(--mode=generate scores them)\n" if left_out else "")
            + "Δ acc = fine-tuned - base; [95%]: bootstrap interval over the questions. McNemar p: the chance of a "
            "split of the questions only one model got right at least this uneven if both models were equally good; "
            "below 0.05 the difference is unlikely to be luck. Unparsed: replies with no readable answer (wrong).")


def write_report(report: dict, tables: dict, report_path: Path) -> None:
    """benchmark.json, .md and .png, all written before any is renamed into place."""
    import io
    import json

    from medsft.exam_report import plot_report
    from medsft.records import write_files_atomically

    png = io.BytesIO()
    plot_report(report["tasks"], png, f"Exam accuracy, base vs fine-tuned ({report['mode']})")
    from medsft.exam_report import reference_lines

    markdown = (f"# Did it help? Base against fine-tuned\n\nbase: `{report['base']}`  \nfine-tuned: "
                f"`{report['finetuned']}`  \n{note_lines(report)}\n\n## By exam\n\n{tables['exams']}\n\n"
                f"{reference_lines()}\n\n## By task\n\n{tables['tasks']}\n")
    write_files_atomically({report_path: json.dumps(report, ensure_ascii=False, indent=2) + "\n",
                            report_path.with_suffix(".md"): markdown,
                            report_path.with_suffix(".png"): png.getvalue()})


if __name__ == "__main__":
    main()

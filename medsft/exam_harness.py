"""Exam tasks run through lm-evaluation-harness: the task folder, the model wrapper and one evaluation pass.

Our tasks are the YAML files in eval_tasks/: two templates (_exam_loglikelihood.yaml, _exam_generate.yaml, whose
filter is utils.read_letters, the answer reader) and the group medical_zh.yaml. For a run, each task's data is
checked and written as question/choices/answer/label rows into a temporary folder, beside a YAML file that
includes its template and sets the task name, the data file and the run's generation settings; lm-eval reads
that folder (TaskManager(include_path=...)). Names that are not
ours (e.g. lm-eval's own ceval-valid_anatomy) go to lm-eval's built-in tasks, which download their data.
"""
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medsft.errors import UserError
from medsft.exam_data import DOWNLOADS, EXAM_NAMES, find_subject_file, read_exam, read_exam_file, stratified_sample
from medsft.generation import END_TOKENS
from medsft.records import jsonl_text

TASK_DIR = Path(__file__).resolve().parent.parent / "eval_tasks"
GROUP = "medical_zh"
MODES = ("loglikelihood", "generate")
MIRROR_HINT = ("or set a hub mirror (HF_ENDPOINT=https://hf-mirror.com; unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE)")


@dataclass
class TaskPlan:
    names: list[str]                       # what simple_evaluate is asked for: tasks and groups
    ours: dict[str, str] = field(default_factory=dict)  # our task -> the exam file it reads
    builtin: list[str] = field(default_factory=list)   # lm-eval's own tasks among names
    exams: dict[str, str] = field(default_factory=dict)  # our task -> its exam (CMB-Exam, CMMLU-Med, ...)
    left_out: dict[str, int] = field(default_factory=dict)  # our task -> multiple-answer questions left out
    drawn: dict[str, list[int]] = field(default_factory=dict)  # our task -> [questions drawn, of how many]


def group_subjects() -> list[str]:
    return yaml.safe_load((TASK_DIR / f"{GROUP}.yaml").read_text(encoding="utf-8"))["task"]


def subject_source(task: str) -> tuple[str, str, str]:
    """(benchmark, subject, split) of a medical_zh task: cmmlu_anatomy -> ("cmmlu", "anatomy", "test")."""
    if task.startswith("cmmlu_"):
        return "cmmlu", task.removeprefix("cmmlu_"), "test"
    return "ceval", task.removeprefix("ceval-valid_"), "val"


def exam_task_name(exam_file) -> str:
    return re.sub(r"[^0-9A-Za-z_]+", "_", Path(exam_file).stem).strip("_").lower() or "exam"


def exam_files(cfg) -> list[str]:
    return [f.strip() for f in cfg.EXAM_FILE.split(",") if f.strip()]


def planned_names(cfg) -> str:
    """What will run, for the printed settings: the exam files' tasks when EXAM_FILE replaces TASKS."""
    return ",".join(exam_task_name(f) for f in exam_files(cfg)) if cfg.EXAM_FILE else cfg.TASKS


def plan_tasks(cfg) -> tuple[TaskPlan, dict]:
    """Which tasks run and, for ours, their checked rows ({task: rows}); every file is read before a model loads.

    Loglikelihood mode leaves multiple-answer questions out (one letter's likelihood cannot answer them) and
    counts them; SAMPLE > 0 then draws SAMPLE questions per exam, stratified by subject, with SEED.
    """
    if cfg.EXAM_FILE:
        plan, rows = TaskPlan([]), {}
        for path in exam_files(cfg):
            name = exam_task_name(path)
            if name in rows:
                raise UserError(f"error: exam_file: two files make the task {name!r}; rename one")
            layout, rows[name] = read_exam(path, cfg.EXAM_FORMAT)
            plan.names.append(name)
            plan.ours[name], plan.exams[name] = str(path), EXAM_NAMES.get(layout, name)
    else:
        plan, rows = plan_medical_zh(cfg)
    if cfg.MODE == "loglikelihood":
        for task in rows:
            single = [row for row in rows[task] if len(row["answer"]) == 1]
            if len(single) < len(rows[task]):
                plan.left_out[task] = len(rows[task]) - len(single)
                rows[task] = single
            if not single:
                raise UserError(f"error: {plan.ours[task]}: every question has several answers; loglikelihood "
                                "mode cannot score them: use --mode=generate")
    if cfg.SAMPLE > 0:
        draw_sample(plan, rows, cfg.SAMPLE, cfg.SEED)
    return plan, rows


def draw_sample(plan: TaskPlan, rows: dict, n: int, seed: int) -> None:
    """n questions per exam (an exam may span several tasks: CMMLU-Med's subjects), stratified by subject."""
    for exam in dict.fromkeys(plan.exams.values()):
        tasks = [t for t in rows if plan.exams[t] == exam]
        pooled = [row | {"_task": t, "subject": row["subject"] or t} for t in tasks for row in rows[t]]
        chosen = stratified_sample(pooled, n, seed)
        for task in tasks:
            picked = [{k: v for k, v in row.items() if k != "_task"} for row in chosen if row["_task"] == task]
            plan.drawn[task] = [len(picked), len(rows[task])]
            rows[task] = picked
        for task in [t for t in tasks if not rows[t]]:  # a subject too small for this sample: not run
            del rows[task], plan.ours[task], plan.exams[task]
            plan.names = [name for name in plan.names if name != task]


def plan_medical_zh(cfg) -> tuple[TaskPlan, dict]:
    subjects = group_subjects()
    wanted = [t.strip() for t in cfg.TASKS.split(",") if t.strip()]
    plan, rows, missing = TaskPlan(wanted), {}, []
    for name in wanted:
        if name != GROUP and name not in subjects:
            plan.builtin.append(name)
            continue
        for task in subjects if name == GROUP else [name]:
            benchmark, subject, split = subject_source(task)
            path = find_subject_file(cfg.EXAM_DIR, benchmark, subject, split) if cfg.EXAM_DIR else None
            if path is None:
                missing.append(f"{benchmark}/{split}/{subject}{'_' + split if benchmark == 'ceval' else ''}.csv")
                continue
            plan.ours[task], rows[task] = str(path), read_exam_file(path)
            plan.exams[task] = "CMMLU-Med" if benchmark == "cmmlu" else "C-Eval-Med"
    if missing and not cfg.EXAM_DIR:
        raise UserError(f"error: tasks={cfg.TASKS!r} reads the official CMMLU and C-Eval CSV files: download them "
                        f"once (CMMLU: {DOWNLOADS['cmmlu']}; C-Eval: {DOWNLOADS['ceval']}), unzip them into "
                        "exams/cmmlu and exams/ceval and pass --exam_dir=exams; or give your own file with --exam_file")
    if missing:
        raise UserError(f"error: exam_dir {cfg.EXAM_DIR}: no file for {len(missing)} task(s): "
                        f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (unzip CMMLU into "
                        f"{cfg.EXAM_DIR}/cmmlu and C-Eval into {cfg.EXAM_DIR}/ceval)")
    return plan, rows


def write_task_folder(folder, plan: TaskPlan, rows: dict, cfg) -> None:
    """Our tasks as lm-eval YAML files plus their data in `folder`, which the TaskManager then includes.

    Each task's YAML includes its template from eval_tasks/ (so `!function utils.read_letters` resolves there)
    and sets the task's name, data file and generation settings; each row says whether its prompt thinks."""
    folder = Path(folder)
    thinking = chat_template_args(cfg)["enable_thinking"]
    for task, task_rows in rows.items():
        data = folder / f"{task}.jsonl"
        data.write_text(jsonl_text([row | {"thinking": thinking} for row in task_rows]), encoding="utf-8")
        config = {"include": str(TASK_DIR / f"_exam_{cfg.MODE}.yaml"), "task": task,
                  "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")}}
        if cfg.MODE == "generate":
            config["generation_kwargs"] = generation_settings(cfg)
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
                                             encoding="utf-8")
    if GROUP in plan.names:
        group = yaml.safe_load((TASK_DIR / f"{GROUP}.yaml").read_text(encoding="utf-8"))
        group["task"] = [t for t in group["task"] if t in rows]  # a sample may leave a small subject out
        (folder / f"{GROUP}.yaml").write_text(yaml.safe_dump(group, allow_unicode=True, sort_keys=False),
                                              encoding="utf-8")


def generation_settings(cfg) -> dict:
    """Qwen3's thinking-mode sampling (T 0.6, top_p 0.95, top_k 20), or greedy with TEMPERATURE=0."""
    settings = {"until": list(END_TOKENS), "max_gen_toks": cfg.MAX_NEW_TOKENS}
    if cfg.TEMPERATURE > 0:
        return settings | {"do_sample": True, "temperature": cfg.TEMPERATURE, "top_p": 0.95, "top_k": 20}
    return settings | {"do_sample": False, "temperature": 0.0}


def task_manager(folder, plan: TaskPlan):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=bool(plan.builtin), verbosity="ERROR")


def check_builtin_tasks(manager, plan: TaskPlan) -> None:
    """Load lm-eval's own tasks' data now (before a model loads); offline, one line that says what to do."""
    from lm_eval.tasks import get_task_dict

    for name in plan.builtin:
        if name not in manager.all_tasks:
            raise UserError(f"error: tasks: unknown task {name!r}: use {GROUP}, one of its subjects "
                            f"({', '.join(group_subjects()[:2])}, ...) or an lm-eval task name")
        try:
            get_task_dict([name], manager)
        except Exception as e:  # datasets and the hub raise many types for "could not fetch"
            raise UserError(f"error: task {name}: its data could not be fetched ({type(e).__name__}); run it "
                            f"from local files with --exam_file=your.jsonl (or --tasks={GROUP} --exam_dir=...), "
                            f"{MIRROR_HINT}") from None


def chat_template_args(cfg) -> dict:
    """loglikelihood: Qwen3's enable_thinking=False rendering (the reply starts after an empty think block);
    generate: the model thinks first unless THINKING=False."""
    return {"enable_thinking": cfg.MODE == "generate" and cfg.THINKING}


def hf_model(model, tokenizer, cfg):
    """lm-eval's transformers wrapper around a model already loaded (the base, or the base with the adapter)."""
    import logging

    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about passing a loaded model are expected
    # HFLM calls model.tie_weights(), which fails on an adapter that trains Qwen3's tied embedding (v2, v3:
    # "attribute 'weight' already exists"); PEFT already tied it when the adapter loaded (ensure_weight_tying).
    model.tie_weights = lambda *args, **kwargs: None
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.BATCH_SIZE, max_length=context_length(cfg),
                    chat_template_args=chat_template_args(cfg))
    finally:
        del model.tie_weights


def vllm_model(model_path: str, adapter_path, cfg):
    """lm-eval's vLLM wrapper; with an adapter, one engine serves both passes (base: no LoRA request).
    Unverified: no GPU has run this path yet."""
    from lm_eval.models.vllm_causallms import VLLM

    rank = json.loads((Path(adapter_path) / "adapter_config.json").read_text())["r"] if adapter_path else 16
    return VLLM(pretrained=model_path, dtype="bfloat16", max_model_len=context_length(cfg), batch_size="auto",
                seed=cfg.SEED, lora_local_path=str(adapter_path) if adapter_path else None, max_lora_rank=rank,
                chat_template_args=chat_template_args(cfg),
                **({"quantization": "bitsandbytes"} if cfg.LOAD_IN_4BIT else {}))


def context_length(cfg) -> int:
    """MAX_LENGTH tokens of prompt, plus MAX_NEW_TOKENS of reply in generate mode."""
    return cfg.MAX_LENGTH + (cfg.MAX_NEW_TOKENS if cfg.MODE == "generate" else 0)


def evaluate(lm, folder, plan: TaskPlan, cfg, manager=None) -> dict:
    """One pass of lm_eval.simple_evaluate over the planned tasks, every per-question sample kept."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=plan.names, task_manager=manager or task_manager(folder, plan), apply_chat_template=True,
        system_instruction=cfg.SYSTEM_PROMPT, log_samples=True, limit=cfg.LIMIT or None, random_seed=cfg.SEED,
        numpy_random_seed=cfg.SEED, torch_random_seed=cfg.SEED, fewshot_random_seed=cfg.SEED, bootstrap_iters=1000,
        verbosity="ERROR")

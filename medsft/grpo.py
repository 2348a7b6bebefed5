"""The GRPO pipeline of train_grpo.py: each function one step of its main(), in call order. The RL loop, the
advantages and the loss are TRL's GRPOTrainer; what is ours is the policy (an SFT adapter continued on the
4-bit base), the prompts' token ids, the held-out greedy accuracy that picks best/, and the outputs.
"""
import importlib.util
import json
import statistics
from pathlib import Path

from transformers import TrainerCallback

from medsft.distributed import optimizer_for_launcher, use_liger_kernel
from medsft.errors import UserError
from medsft.records import read_jsonl
from medsft.trainer import LoggingCallback, QLoRATrainer, gpu_memory_peaks

GRPO_VERSION = "grpo"
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")


# ---------------------------------------------------------------------------------------------------------
# 1. settings and the chain base -> SFT run -> this run


def starting_point(cfg) -> str:
    """"adapter" (continue SFT_ADAPTER), "model" (a merged or full model folder: a fresh LoRA on it) or "base"."""
    if not cfg.SFT_ADAPTER:
        return "base"
    folder = Path(cfg.SFT_ADAPTER)
    return "adapter" if (folder / "adapter_config.json").is_file() else "model" if (folder / "config.json").is_file() \
        else "missing"


def take_sft_run_settings(cfg) -> dict:
    """The SFT run's base, system prompt and data (unless given on the command line), and the chain recorded in
    settings.json (base -> SFT run -> this run), so that inference_lora.py, evaluate.py, benchmark.py, merge_lora.py
    and web_demo.py read this run's final/ as they read an SFT run's."""
    from medsft.settings import read_run_settings, use_run_settings

    kind = starting_point(cfg)
    run = {}
    if kind == "adapter":
        run = use_run_settings(cfg, folder=cfg.SFT_ADAPTER)  # MODEL_PATH, SYSTEM_PROMPT from the SFT run
    elif kind == "model":
        run = read_run_settings(cfg.SFT_ADAPTER)
        if "SYSTEM_PROMPT" in run and "SYSTEM_PROMPT" not in cfg._given:
            cfg.SYSTEM_PROMPT = run["SYSTEM_PROMPT"]
        cfg.MODEL_PATH = cfg.SFT_ADAPTER  # the merged model is the base of the fresh LoRA
    origins = getattr(cfg, "_origins", None)
    for name in ("DATA_DIR", "MAX_LENGTH", "LONG_EXAMPLES"):  # evaluate.py and benchmark.py read these from the run
        if name in run:
            setattr(cfg, name, run[name])
            if origins is not None:
                origins[name] = "from the SFT run"
    sft = None if kind == "base" else {"path": cfg.SFT_ADAPTER, "version": run.get("VERSION"),
                                       "output_dir": run.get("OUTPUT_DIR")}
    cfg.CHAIN = [{"stage": "base", "path": cfg.MODEL_PATH if kind != "model" else run.get("MODEL_PATH")},
                 *([{"stage": "sft", **sft}] if sft else []),
                 {"stage": "grpo", "path": "final/"}]  # this run's, wherever its folder is moved
    if origins is not None:
        origins["CHAIN"] = "base -> SFT run -> this run"
    return run


def check_grpo_settings(cfg) -> list[str]:
    """Every problem with the GRPO settings, found before anything slow starts."""
    from medsft.grpo_data import exam_files_problems
    from medsft.training import TRACKERS, _library_choice_problems, _lora_problems, _writable, schedule_problems

    kind = starting_point(cfg)
    problems = exam_files_problems(cfg)
    if kind == "missing":
        problems.append(f"sft_adapter {cfg.SFT_ADAPTER}: no adapter (adapter_config.json) or model (config.json) "
                        "there; train one first (python train_lora3.py), or pass --sft_adapter= for a fresh LoRA")
    if not _writable(Path(cfg.OUTPUT_DIR)):
        problems.append(f"output_dir {cfg.OUTPUT_DIR} is not writable")
    for name in ("BATCH_SIZE", "GRADIENT_ACCUMULATION", "EVAL_STEPS", "SAVE_STEPS", "LOG_STEPS", "EVAL_BATCH_SIZE",
                 "MAX_COMPLETION_LENGTH", "VAL_QUESTIONS"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name.lower()} must be at least 1, not {getattr(cfg, name)}")
    if cfg.NUM_GENERATIONS < 2:
        problems.append(f"num_generations must be at least 2 (GRPO compares a question's answers), not "
                        f"{cfg.NUM_GENERATIONS}")
    elif (cfg.BATCH_SIZE * cfg.GRADIENT_ACCUMULATION) % cfg.NUM_GENERATIONS:
        problems.append(f"batch_size x gradient_accumulation ({cfg.BATCH_SIZE} x {cfg.GRADIENT_ACCUMULATION}) must "
                        f"be a multiple of num_generations ({cfg.NUM_GENERATIONS}): each step holds whole groups")
    if not 0 <= cfg.THINK_BUDGET < cfg.MAX_COMPLETION_LENGTH:
        problems.append(f"think_budget must be in [0, max_completion_length={cfg.MAX_COMPLETION_LENGTH}), "
                        f"not {cfg.THINK_BUDGET}")
    if not cfg.TEMPERATURE > 0:
        problems.append(f"temperature must be positive (GRPO samples), not {cfg.TEMPERATURE}")
    if not 0 < cfg.TOP_P <= 1:
        problems.append(f"top_p must be in (0, 1], not {cfg.TOP_P}")
    if cfg.BETA < 0:
        problems.append(f"beta must be 0 or more, not {cfg.BETA}")
    if cfg.LOSS_TYPE not in LOSS_TYPES:
        problems.append(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {cfg.LOSS_TYPE!r}")
    problems += schedule_problems(cfg)
    if cfg.REPORT_TO not in TRACKERS:
        problems.append(f"report_to must be one of {', '.join(TRACKERS)}, not {cfg.REPORT_TO!r}")
    if cfg.RESUME not in ("auto", "never") and not Path(cfg.RESUME).is_dir():
        problems.append(f"resume must be 'auto', 'never' or a checkpoint folder; {cfg.RESUME!r} is none of these")
    if cfg.USE_VLLM and importlib.util.find_spec("vllm") is None:
        problems.append("use_vllm=True but vllm is not installed (pip install vllm); or --use_vllm=False")
    if kind != "adapter":
        problems += _lora_problems(cfg)
    return problems + _library_choice_problems(cfg)


# ---------------------------------------------------------------------------------------------------------
# 3. the policy: the SFT adapter, trainable, on the 4-bit base


def load_policy_model(model_path: str, cfg):
    """The base (4-bit NF4 unless LOAD_IN_4BIT=False) with SFT_ADAPTER loaded trainable, or a fresh LoRA."""
    import torch
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from medsft.model_loading import compute_dtype, load_base_model
    from medsft.training import _widen_to_fp32, build_lora_config

    set_seed(cfg.SEED)
    model = load_base_model(model_path, cfg.LOAD_IN_4BIT, cfg.ATTN_IMPLEMENTATION)
    model.config.use_cache = False
    if cfg.LOAD_IN_4BIT:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.GRADIENT_CHECKPOINTING,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        if torch.cuda.is_available():  # as training.py: the frozen embedding stays bf16, its output widened
            model.get_input_embeddings().to(compute_dtype())
    if starting_point(cfg) == "adapter":
        try:
            model = PeftModel.from_pretrained(model, cfg.SFT_ADAPTER, is_trainable=True)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"error: could not load the adapter in {cfg.SFT_ADAPTER} onto {model_path}: "
                            f"{str(e).splitlines()[0]}") from None
    else:
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        set_seed(cfg.SEED)
        model = get_peft_model(model, build_lora_config(cfg, tied=tied))
    if cfg.LOAD_IN_4BIT and torch.cuda.is_available():
        model.get_input_embeddings().register_forward_hook(_widen_to_fp32)
    keep_sft_rows(model)
    keep_trainable_fp32(model)
    if not cfg.LOAD_IN_4BIT and not torch.cuda.is_available():
        model.to(torch.float32)  # bf16 matmuls are slow on CPU
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
          + (f"; continuing the adapter {cfg.SFT_ADAPTER}" if starting_point(cfg) == "adapter" else
             "; a fresh LoRA"), flush=True)
    model.trainable_params = trainable
    return model


def keep_sft_rows(model) -> None:
    """An SFT adapter's trained embedding rows (v2/v3, EMBEDDING_MODE="tokens") are kept as SFT left them: merged
    into the embedding in memory and frozen, while its LoRA trains on. TRL's fused LM head reads lm_head.weight
    directly, which would be the rows before SFT; merged, generation and the loss see the same model. They are
    saved unchanged with the adapter."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    for layer in layers:
        layer.merge()
        for param in layer.trainable_tokens_delta.parameters():
            param.requires_grad = False
    head = model.get_output_embeddings()
    if layers and not hasattr(head, "bias"):
        head.bias = None  # Qwen3's lm_head has none; PEFT's wrapper does not say so, and TRL asks


def keep_trainable_fp32(model) -> None:
    """fp32 master weights for the trained tensors: TRL casts a quantized model's adapter to bf16, where an Adam
    step at GRPO's learning rate (~1e-5, about 1e-3 of a LoRA weight) is below bf16's resolution and is lost."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


# ---------------------------------------------------------------------------------------------------------
# 4. trainer


def grpo_arguments(cfg, reward_weights: list[float]):
    """GRPOConfig from the settings (the Trainer's part as training_arguments builds it)."""
    import torch
    from trl import GRPOConfig

    from medsft.model_loading import compute_dtype
    from medsft.training import resolve_report_to, tracker_callbacks

    cuda, run_name = torch.cuda.is_available(), f"{GRPO_VERSION}-{Path(cfg.OUTPUT_DIR).name}"
    report_to, _ = tracker_callbacks(resolve_report_to(cfg.REPORT_TO, cfg.OUTPUT_DIR), run_name)
    vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_enable_sleep_mode": True,
            "vllm_gpu_memory_utilization": cfg.VLLM_GPU_MEMORY_UTILIZATION} if cfg.USE_VLLM and cuda else {}
    return GRPOConfig(
        output_dir=cfg.OUTPUT_DIR, run_name=run_name,
        per_device_train_batch_size=cfg.BATCH_SIZE, gradient_accumulation_steps=cfg.GRADIENT_ACCUMULATION,
        per_device_eval_batch_size=cfg.NUM_GENERATIONS,  # unused (our greedy eval), but TRL checks its divisibility
        num_train_epochs=cfg.EPOCHS, max_steps=cfg.MAX_STEPS, learning_rate=cfg.LEARNING_RATE,
        lr_scheduler_type=cfg.LR_SCHEDULER, warmup_steps=cfg.WARMUP_RATIO, weight_decay=cfg.WEIGHT_DECAY,
        optim=optimizer_for_launcher(cfg.OPTIM), max_grad_norm=cfg.MAX_GRAD_NORM,
        logging_steps=cfg.LOG_STEPS, logging_first_step=True, eval_strategy="steps", eval_steps=cfg.EVAL_STEPS,
        save_strategy="steps", save_steps=cfg.SAVE_STEPS, save_total_limit=cfg.SAVE_TOTAL_LIMIT,
        bf16=cuda and compute_dtype() == torch.bfloat16, fp16=cuda and compute_dtype() == torch.float16,
        gradient_checkpointing=cfg.GRADIENT_CHECKPOINTING, gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=report_to, seed=cfg.SEED, data_seed=cfg.SEED, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=not cfg.PROGRESS_BAR, use_liger_kernel=use_liger_kernel(
            cfg.USE_LIGER_KERNEL), ddp_find_unused_parameters=False,
        # GRPO
        num_generations=cfg.NUM_GENERATIONS, max_completion_length=cfg.MAX_COMPLETION_LENGTH,
        temperature=cfg.TEMPERATURE, top_p=cfg.TOP_P, top_k=cfg.TOP_K, beta=cfg.BETA, loss_type=cfg.LOSS_TYPE,
        mask_truncated_completions=cfg.MASK_TRUNCATED_COMPLETIONS, reward_weights=reward_weights,
        chat_template_kwargs={"enable_thinking": True}, log_completions=False, **vllm,
    )


class GRPOExamTrainer:
    """Mixed into TRL's GRPOTrainer (make_trainer_class): prompts as the chat format's ids, greedy held-out accuracy
    as the evaluation, best/ kept on disk (QLoRATrainer's own save, restore and resume code)."""

    save_best = QLoRATrainer.save_best
    restore_best = QLoRATrainer.restore_best
    load_metrics_until = QLoRATrainer.load_metrics_until
    sharded = QLoRATrainer.sharded

    def setup_exam(self, prompts, best_dir, eval_batch_size: int) -> None:
        from medsft.trainer import saved_names_and_shapes

        self.exam_prompts, self.best_dir, self.eval_batch_size = prompts, Path(best_dir), eval_batch_size
        self.last_eval_step = None
        self.add_callback(StepClock(self._metrics["train"]))
        self.saved_weights = saved_names_and_shapes(self.model)
        best_file = self.best_dir / "eval.json"
        self.best = json.loads(best_file.read_text()) if best_file.exists() else None

    @property
    def tokens_seen(self) -> int:
        return self.state.num_input_tokens_seen

    def _tokenize_prompts(self, prompts: list):
        """The chat format's ids of each rendered prompt (TRL would tokenise the text: typed control text would
        become control tokens)."""
        if not isinstance(prompts[0], str) or prompts[0] not in self.exam_prompts.prompt_ids:
            return super()._tokenize_prompts(prompts)
        return [self.exam_prompts.prompt_ids[p] for p in prompts], None, {}

    def _generate(self, prompts: list):
        """TRL's sampling of a step's completions, timed: `time/generation_s` in metrics.jsonl; the rest of
        `time/step_s` is the update (scoring, log-probabilities, forward and backward, the optimizer)."""
        start = synchronized_clock()
        generated = super()._generate(prompts)
        self._metrics["train"]["time/generation_s"].append(synchronized_clock() - start)
        return generated

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Greedy replies to the held-out questions: accuracy (the reward's reading: right letters, not cut off),
        the unparsed and cut-off shares. The best accuracy's adapter is saved to best/."""
        import torch
        from transformers import Trainer
        from trl.models import unwrap_model_for_generation

        from medsft.answer_reader import is_correct, read_answer
        from medsft.generation import generate_from_prompts

        rows = self.exam_prompts.val_rows[self.args.process_index::self.args.world_size]
        counts = torch.zeros(4, dtype=torch.float64)  # right, unparsed, cut off, questions
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as model:
            was_training = model.training
            model.eval()
            for start in range(0, len(rows), self.eval_batch_size):
                batch = rows[start:start + self.eval_batch_size]
                replies = generate_from_prompts(model, self.processing_class,
                                                [self.exam_prompts.prompt_ids[r["prompt"]] for r in batch],
                                                max_new_tokens=self.args.max_completion_length, temperature=0)
                for row, reply in zip(batch, replies):
                    cut = reply.finish_reason != "stop"
                    counts += torch.tensor([float(not cut and is_correct(reply.text, row["answer"])),
                                            float(read_answer(reply.text) is None), float(cut), 1.0],
                                           dtype=torch.float64)
            model.train(was_training)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts.to(self.args.device), "sum").cpu()
        right, unparsed, cut, n = counts.tolist()
        metrics = {f"{metric_key_prefix}_accuracy": right / n, f"{metric_key_prefix}_unparsed": unparsed / n,
                   f"{metric_key_prefix}_clipped": cut / n, f"{metric_key_prefix}_questions": int(n)}
        self.last_eval_step = self.state.global_step
        if metric_key_prefix == "eval" and (self.best is None or right / n > self.best["eval_accuracy"]):
            self.best = {"step": self.state.global_step, "eval_accuracy": right / n}
            self.save_best()
        Trainer.log(self, metrics)  # not GRPOTrainer.log, which would flush the training window's averages here
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def synchronized_clock() -> float:
    """time.perf_counter() once the GPU's queued work is done (on CUDA): what a step really took."""
    import time

    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepClock(TrainerCallback):
    """Each optimizer step's wall time, GPU work included, into the trainer's metrics (`time/step_s`), which TRL
    averages over the logging window."""

    def __init__(self, metrics):
        self.metrics, self.start = metrics, None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = synchronized_clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.metrics["time/step_s"].append(synchronized_clock() - self.start)


def make_trainer_class():
    from trl import GRPOTrainer

    return type("GRPOExamTrainer", (GRPOExamTrainer, GRPOTrainer), {})


def build_grpo_trainer(cfg, model, tokenizer, prompts, reward_funcs, reward_weights, args=None):
    """GRPOTrainer on the exam prompts with the given rewards; LoggingCallback, RunClock and trackers as the SFT
    scripts have them."""
    from datasets import Dataset

    from medsft.trainer import RunClock, ShareableCheckpoints, use_readable_logging
    from medsft.training import resolve_report_to, tracker_callbacks

    args = args or grpo_arguments(cfg, reward_weights)
    _, tracker_cbs = tracker_callbacks(resolve_report_to(cfg.REPORT_TO, cfg.OUTPUT_DIR), args.run_name)
    callbacks = [GRPOLoggingCallback(Path(cfg.OUTPUT_DIR) / "metrics.jsonl"), RunClock(), ShareableCheckpoints(),
                 *tracker_cbs]
    tokenizer.padding_side = "left"  # TRL pads prompts on the left for generation
    trainer = make_trainer_class()(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=Dataset.from_list(prompts.train_rows),
        eval_dataset=Dataset.from_list(prompts.val_rows), processing_class=tokenizer, callbacks=callbacks)
    keep_trainable_fp32(trainer.model)
    trainer.setup_exam(prompts, Path(cfg.OUTPUT_DIR) / "best", cfg.EVAL_BATCH_SIZE)
    use_readable_logging(trainer, cfg.PROGRESS_BAR)
    return trainer


class GRPOLoggingCallback(LoggingCallback):
    """One readable line per logging step with each reward's mean, and every record in metrics.jsonl; `accuracy` is
    the training completions' share of right answers (the correct reward's mean)."""

    SHOWN = (("reward", "reward", ".3f"), ("accuracy", "acc", ".3f"), ("rewards/format_reward/mean", "format", ".2f"),
             ("rewards/language_reward/mean", "language", ".2f"),
             ("rewards/think_budget_reward/mean", "think budget", ".2f"), ("unparsed", "unparsed", ".2f"),
             ("completions/mean_length", "length", ".0f"), ("completions/clipped_ratio", "clipped", ".2f"),
             ("time/step_s", "step s", ".1f"), ("time/generation_s", "generating s", ".1f"),
             ("eval_accuracy", "held-out accuracy", ".3f"), ("eval_unparsed", "held-out unparsed", ".2f"),
             ("learning_rate", "lr", ".2e"), ("grad_norm", "grad_norm", ".3f"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        accuracy = {"accuracy": logs["rewards/correct_reward/mean"]} if "rewards/correct_reward/mean" in logs else {}
        record = self.write_record(state, logs, **accuracy)
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{label} {record[key]:{fmt}}" for key, label, fmt in self.SHOWN
                  if isinstance(record.get(key), (int, float))]
        if len(parts) > 1:
            from tqdm.auto import tqdm

            tqdm.write(" | ".join(parts))


# ---------------------------------------------------------------------------------------------------------
# 6. results


def save_grpo_results(cfg, trainer, tokenizer, wall_time: float, prompts) -> dict:
    """final/ (the best adapter, tokenizer, settings), summary.json and reward.png in OUTPUT_DIR (main process)."""
    import torch

    from medsft.training import publish_final

    out = Path(cfg.OUTPUT_DIR)
    best = trainer.restore_best()
    final = out / "final"
    records = [r for _, r in read_jsonl(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
    train_logs = [r for r in records if "reward" in r]
    cuda = torch.cuda.is_available()
    summary = {
        "version": cfg.VERSION, "key_change": cfg.KEY_CHANGE,
        "best_eval_accuracy": best["eval_accuracy"], "best_step": best["step"],
        "first_eval_accuracy": next((r["eval_accuracy"] for r in records if "eval_accuracy" in r), None),
        "final_reward": train_logs[-1]["reward"] if train_logs else None,
        "final_train_accuracy": train_logs[-1].get("accuracy") if train_logs else None,
        "steps": trainer.state.global_step, "wall_time_s": round(wall_time, 2),
        **step_timings(train_logs, wall_time, trainer.state.global_step),
        "train_questions": len(prompts.train_rows), "held_out_questions": len(prompts.val_rows),
        "dropped_as_benchmark": prompts.dropped_as_benchmark, "benchmark_files": list(cfg.BENCHMARK_FILE),
        "chain": cfg.CHAIN, "tokens": trainer.tokens_seen,
        **gpu_memory_peaks(trainer),
        "trainable_params": getattr(trainer.model, "trainable_params", None),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model_path": cfg.MODEL_PATH, "final_dir": str(final),
    }
    if trainer.is_world_process_zero():
        tokenizer.padding_side = "right"  # as the SFT runs save it (TRL generates with left padding)
        publish_final(trainer, tokenizer, cfg, out, final, summary)
        plotted = plot_rewards(out / "metrics.jsonl", out / "reward.png", title=f"{cfg.VERSION}: {cfg.KEY_CHANGE}")
        print(f"best held-out accuracy {best['eval_accuracy']:.3f} at step {best['step']}; adapter in {final}/")
        print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'}" + (f", {out / 'reward.png'}" if plotted else
              " (no reward.png: matplotlib is not installed)"), flush=True)
    trainer.accelerator.wait_for_everyone()
    return summary


def step_timings(train_logs: list[dict], wall_time: float, steps: int) -> dict:
    """seconds_per_step (the median logged step, generation and update; the wall time over the steps when none was
    logged) and generation_share (of the logged steps' time, the part spent sampling the completions)."""
    step_s = [r["time/step_s"] for r in train_logs if isinstance(r.get("time/step_s"), (int, float))]
    generation_s = [r["time/generation_s"] for r in train_logs if isinstance(r.get("time/generation_s"), (int, float))]
    if not step_s:
        return {"seconds_per_step": round(wall_time / max(1, steps), 2), "generation_share": None}
    return {"seconds_per_step": round(statistics.median(step_s), 2),
            "generation_share": round(sum(generation_s) / sum(step_s), 3) if len(generation_s) == len(step_s)
            else None}


def plot_rewards(metrics_path: Path, png_path: Path, title: str) -> bool:
    """reward.png: the total reward and each component per logging step, and the held-out accuracy."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [row for _, row in read_jsonl(metrics_path)] if metrics_path.exists() else []
    train = [r for r in records if "reward" in r]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=[3, 2])
    if train:
        steps = [r["step"] for r in train]
        top.plot(steps, [r["reward"] for r in train], label="reward (weighted sum)", lw=2)
        for key in sorted({k for r in train for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
            top.plot(steps, [r.get(key) for r in train], label=key.split("/")[1], lw=1)
    evals = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    if evals:
        bottom.plot([s for s, _ in evals], [a for _, a in evals], "o-", label="held-out accuracy (greedy)")
    top.set_title(title)
    top.set_ylabel("reward")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("accuracy")
    bottom.set_xlabel("step")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def print_dry_run_reward(prompts, cfg) -> dict:
    """The dry run's check of the rewards: each one's score of a written completion to the first question."""
    from medsft.rewards import reward_functions

    row = prompts.train_rows[0]
    completion = f"<think>\n这道题考查的是相关的医学知识，逐项分析选项。\n</think>\n\n答案：{row['answer']}"
    functions, weights = reward_functions(cfg.THINK_BUDGET, cfg.MAX_COMPLETION_LENGTH)
    ids = [[0] * 12 + [151668, 0, 0, 151645]]  # a 12-token think, then </think>, the answer, the end token
    scores = {f.__name__: f([completion], answer=[row["answer"]], completion_ids=ids)[0] for f in functions}
    total = sum(w * s for w, s in zip(weights, scores.values()))
    print(f"==== the rewards of a written completion (right answer {row['answer']}) ====\n{completion}\n"
          + " | ".join(f"{name} {score:.2f} x {w}" for (name, score), w in zip(scores.items(), weights))
          + f" = {total:.2f}\n====", flush=True)
    return scores


def grpo_data_fingerprint(cfg) -> str:
    """sha256 of the exam and benchmark files: a resumed run must train on the same questions."""
    import hashlib

    digest = hashlib.sha256()
    for path in [*cfg.EXAM_FILE, "--", *cfg.BENCHMARK_FILE]:
        digest.update(path.encode() if path == "--" else Path(path).read_bytes())
    return digest.hexdigest()

"""The QLoRA training pipeline shared by train_lora.py, train_lora2.py and train_lora3.py.

Each function is one step of the scripts' main(), in call order.
"""
import json
import os
import shutil
import time
from pathlib import Path

from medsft.chat_format import row_system_prompt, split_conversation
from medsft.distributed import (check_sharding_is_on, fsdp_activation_checkpointing, is_main_process, launch_problems,
                                optimizer_for_launcher, shard_tied_token_rows, sharding, use_liger_kernel, world_size)
from medsft.errors import UserError, exit_on_interrupt
from medsft.records import read_jsonl, write_files_atomically
from medsft.resume import last_complete_checkpoint, remove_incomplete_checkpoints
from medsft.training_data import TrainingData

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
SWANLAB_PROJECT = "qwen3-medical-r1"
TRACKERS = ("auto", "swanlab", "tensorboard", "none")  # REPORT_TO: auto = SwanLab when logged in, else none
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Qwen3's linear layers
EMBEDDING_MODES = ("tokens", "full")  # v2/v3: train the rows of the data's tokens, or every row (modules_to_save)
LIGER_INSTALL = "pip install 'liger-kernel>=0.6,<1'"


# ---------------------------------------------------------------------------------------------------------
# 1. settings


def schedule_problems(cfg) -> list[str]:
    """The learning rate, warm-up and length of a run: the same rules in every training script (SFT and GRPO)."""
    problems = []
    if not cfg.LEARNING_RATE > 0:
        problems.append(f"learning_rate must be positive, not {cfg.LEARNING_RATE}")
    if not 0 <= cfg.WARMUP_RATIO < 1:
        problems.append(f"warmup_ratio must be in [0, 1), not {cfg.WARMUP_RATIO}")
    if cfg.MAX_STEPS == 0 or cfg.MAX_STEPS < -1:
        problems.append(f"max_steps must be -1 (use epochs) or positive, not {cfg.MAX_STEPS}")
    elif cfg.MAX_STEPS == -1 and not cfg.EPOCHS > 0:
        problems.append(f"epochs must be positive when max_steps is -1, not {cfg.EPOCHS}")
    return problems


def check_training_settings(cfg) -> list:
    """Every problem with the settings, found before anything slow starts."""
    data_dir, out = Path(cfg.DATA_DIR), Path(cfg.OUTPUT_DIR)
    problems = [
        f"{data_dir / name}: not found; run `python data.py` first (or pass --data_dir)"
        for name in ("train.jsonl", "val.jsonl") if not (data_dir / name).is_file()
    ]
    if not _writable(out):
        problems.append(f"output_dir {out} is not writable")
    for name in ("BATCH_SIZE", "GRADIENT_ACCUMULATION", "EVAL_STEPS", "SAVE_STEPS", "LOG_STEPS",
                 "EVAL_BATCH_SIZE"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name.lower()} must be at least 1, not {getattr(cfg, name)}")
    if cfg.MAX_LENGTH < 128:
        problems.append(f"max_length must be at least 128, not {cfg.MAX_LENGTH}")
    problems += schedule_problems(cfg)
    for name in ("MAX_GRAD_NORM", "WEIGHT_DECAY"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name.lower()} must be 0 or more, not {getattr(cfg, name)}")
    if hasattr(cfg, "LORA_R"):  # train.py (full fine-tuning) has no LoRA settings
        problems += _lora_problems(cfg)
    problems += _library_choice_problems(cfg) + launch_problems()
    if cfg.LR_SCHEDULER not in SCHEDULERS:
        problems.append(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, not {cfg.LR_SCHEDULER!r}")
    if not 0 <= cfg.NO_THINK_FRACTION <= 1:
        problems.append(f"no_think_fraction must be in [0, 1], not {cfg.NO_THINK_FRACTION}")
    if cfg.LONG_EXAMPLES not in ("shorten_think", "drop"):
        problems.append(f"long_examples must be 'shorten_think' or 'drop', not {cfg.LONG_EXAMPLES!r}")
    if cfg.REPORT_TO not in TRACKERS:
        problems.append(f"report_to must be one of {', '.join(TRACKERS)}, not {cfg.REPORT_TO!r}")
    if cfg.RESUME not in ("auto", "never") and not Path(cfg.RESUME).is_dir():
        problems.append(f"resume must be 'auto', 'never' or a checkpoint folder; {cfg.RESUME!r} is none of these")
    if not cfg.MODEL_PATH:
        problems.append("model_path is empty")
    return problems


def _lora_problems(cfg) -> list[str]:
    problems = []
    if cfg.LORA_R < 1:
        problems.append(f"lora_r must be at least 1, not {cfg.LORA_R}")
    if not 0 <= cfg.LORA_DROPOUT < 1:
        problems.append(f"lora_dropout must be in [0, 1), not {cfg.LORA_DROPOUT}")
    if not cfg.LORA_ALPHA > 0:
        problems.append(f"lora_alpha must be positive, not {cfg.LORA_ALPHA}")
    if not cfg.TARGET_MODULES or set(cfg.TARGET_MODULES) - set(PROJECTIONS):
        problems.append(f"target_modules must be some of {', '.join(PROJECTIONS)}, not {list(cfg.TARGET_MODULES)}")
    if set(cfg.MODULES_TO_SAVE) - {"embed_tokens", "lm_head"}:
        problems.append(f"modules_to_save may hold embed_tokens and lm_head, not {list(cfg.MODULES_TO_SAVE)}")
    if getattr(cfg, "EMBEDDING_MODE", "full") not in EMBEDDING_MODES:
        problems.append(f"embedding_mode must be 'tokens' or 'full', not {cfg.EMBEDDING_MODE!r}")
    if sharding() == "fsdp" and getattr(cfg, "EMBEDDING_MODE", None) == "tokens" and cfg.MODULES_TO_SAVE \
            and not getattr(cfg, "LOAD_IN_4BIT", True):
        # the FSDP2 units are made before accelerate's (medsft/distributed.py, shard_tied_token_rows), which
        # skips accelerate's loading of a bf16 model from rank 0 (the other ranks hold empty weights until then)
        problems.append("embedding_mode 'tokens' under FSDP needs load_in_4bit=True (QLoRA); pass "
                        "--embedding_mode=full for a bf16 LoRA (or launch with DDP or DeepSpeed)")
    if fsdp_activation_checkpointing() and cfg.GRADIENT_CHECKPOINTING:
        # the Trainer refuses both (a ValueError): FSDP's own checkpointing does the recomputing
        problems.append("the accelerate config sets fsdp_activation_checkpointing: true, which recomputes the "
                        "activations itself; pass --gradient_checkpointing=False with it")
    if not getattr(cfg, "EMBEDDING_LEARNING_RATE", 1) > 0:
        problems.append(f"embedding_learning_rate must be positive, not {cfg.EMBEDDING_LEARNING_RATE}")
    return problems


def _library_choice_problems(cfg) -> list[str]:
    import importlib.util

    import torch
    from transformers.training_args import OptimizerNames

    problems = []
    if cfg.OPTIM not in {o.value for o in OptimizerNames}:
        problems.append(f"optim {cfg.OPTIM!r} is not a transformers optimizer (e.g. paged_adamw_8bit, adamw_torch)")
    attention = {"sdpa", "eager"} | ({"flex_attention"} if torch.cuda.is_available() else set()) \
        | ({"flash_attention_2"} if importlib.util.find_spec("flash_attn") else set())
    if cfg.ATTN_IMPLEMENTATION not in attention:
        problems.append(f"attn_implementation {cfg.ATTN_IMPLEMENTATION!r} is not available here "
                        f"(choose from {', '.join(sorted(attention))})")
    if cfg.USE_LIGER_KERNEL and torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is None:
        problems.append(f"liger-kernel is not installed, so the loss would materialise the full-vocabulary logits "
                        f"(GBs at 2k tokens): {LIGER_INSTALL}, or pass --use_liger_kernel=False to accept that")
    return problems


def _writable(path: Path) -> bool:
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK)


# ---------------------------------------------------------------------------------------------------------
# 2. data: medsft/training_data.py


# ---------------------------------------------------------------------------------------------------------
# 3. model


def load_lora_model(model_path: str, cfg, data: TrainingData | None = None):
    """The base model (4-bit NF4 unless LOAD_IN_4BIT=False) with fresh LoRA adapters.

    With EMBEDDING_MODE="tokens", `data` gives the embedding rows to train: the tokens of its training inputs.
    """
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from medsft.model_loading import compute_dtype, load_base_model

    set_seed(cfg.SEED)  # before get_peft_model draws the LoRA init: every rank, and every run, starts the same
    model = load_base_model(model_path, cfg.LOAD_IN_4BIT, cfg.ATTN_IMPLEMENTATION)
    model.config.use_cache = False
    if cfg.LOAD_IN_4BIT:
        # casts norms (and the frozen embedding) to fp32 and makes inputs require grads for checkpointing
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.GRADIENT_CHECKPOINTING,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        if torch.cuda.is_available():
            # ... but a frozen fp32 embedding only costs memory (0.62 GB more at 1.7B, and every merged copy
            # "tokens" makes is twice as big): keep it bf16; its output is widened to fp32 below, exactly
            model.get_input_embeddings().to(compute_dtype())
    elif cfg.GRADIENT_CHECKPOINTING:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    token_indices = trained_token_indices(data, cfg)
    lora = build_lora_config(cfg, tied=bool(getattr(model.config, "tie_word_embeddings", False)),
                             token_indices=token_indices)
    set_seed(cfg.SEED)  # the LoRA initialisation is random: the same SEED gives the same adapter
    model = get_peft_model(model, lora)
    if cfg.LOAD_IN_4BIT and torch.cuda.is_available():
        model.get_input_embeddings().register_forward_hook(_widen_to_fp32)
    for param in model.parameters():  # the optimizer's master weights: fp32 (a bf16 base gives bf16 copies)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: the whole, not 1/N
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
          + (f"; fully trained: {fully_trained(lora)}" if lora.modules_to_save else "")
          + (f"; embedding rows trained: {len(token_indices):,} of {model.config.vocab_size:,} (the tokens of the "
             "training inputs)" if token_indices else ""), flush=True)
    model.trainable_params = trainable
    if lora.modules_to_save and getattr(cfg, "EMBEDDING_MODE", None) == "full":
        model.embedding_learning_rate = cfg.EMBEDDING_LEARNING_RATE  # its own param group (QLoRATrainer)
    if not cfg.LOAD_IN_4BIT and not torch.cuda.is_available() and not sharding():
        model.to(torch.float32)  # bf16 matmuls are slow on CPU
    return model


def fully_trained(lora) -> str:
    """The modules trained whole, each named once (PEFT lists a module under its short and its full name)."""
    names = sorted({name.rsplit(".", 1)[-1] for name in lora.modules_to_save})
    tied = "embed_tokens" in names and lora.ensure_weight_tying
    return ", ".join(f"{name} (tied to lm_head: one matrix)" if tied and name == "embed_tokens" else name
                     for name in names)


def _widen_to_fp32(module, args, output):
    return output.float()  # what the fp32 embedding of prepare_model_for_kbit_training gave, bit for bit


def build_lora_config(cfg, tied: bool, token_indices: list[int] | None = None):
    from peft import LoraConfig

    modules_to_save = list(cfg.MODULES_TO_SAVE)
    if tied and {"embed_tokens", "lm_head"} <= set(modules_to_save):
        # Qwen3 (0.6B-4B) ties lm_head to embed_tokens: one matrix. Training two separate copies (as the
        # original did) would double its memory and untie the model; train the one shared matrix instead.
        modules_to_save.remove("lm_head")
    trainable_tokens = None
    if token_indices:  # EMBEDDING_MODE="tokens": the listed rows of the same modules; PEFT keeps a tie by itself
        trainable_tokens = {name: list(token_indices) for name in modules_to_save}
        modules_to_save = []
    return LoraConfig(
        r=cfg.LORA_R, lora_alpha=cfg.LORA_ALPHA, lora_dropout=cfg.LORA_DROPOUT,
        target_modules=list(cfg.TARGET_MODULES), modules_to_save=modules_to_save or None,
        trainable_token_indices=trainable_tokens,
        ensure_weight_tying=bool(modules_to_save and tied), bias="none", task_type="CAUSAL_LM",
    )


def trained_token_indices(data: TrainingData | None, cfg) -> list[int] | None:
    """EMBEDDING_MODE="tokens": every token id of the training inputs (v3: unmasked and fully masked questions,
    and the placeholders); None when the embedding is not trained or is trained in full."""
    if getattr(cfg, "EMBEDDING_MODE", None) != "tokens" or not cfg.MODULES_TO_SAVE:
        return None
    if data is None:
        raise ValueError("EMBEDDING_MODE='tokens' needs the training data to pick the embedding rows")
    train_set = data.train_set
    if hasattr(train_set, "variant_token_ids"):  # read from the examples as tokenized once
        return sorted(train_set.variant_token_ids())
    if hasattr(train_set, "token_set"):
        return sorted(train_set.token_set())
    examples = train_set.every_variant() if hasattr(train_set, "every_variant") else train_set
    return sorted({token for example in examples for token in example["input_ids"]})


# ---------------------------------------------------------------------------------------------------------
# 4. trainer


def resolve_report_to(choice: str, output_dir) -> list[str]:
    """The trackers to log to: SwanLab when asked or logged in (offline without a key: never a login prompt)."""
    import importlib.util

    if choice == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None:
            raise UserError("error: report_to='tensorboard' but tensorboard is not installed (pip install tensorboard)")
        return ["tensorboard"]
    if choice == "none" or importlib.util.find_spec("swanlab") is None:
        if choice == "swanlab":
            raise UserError("error: report_to='swanlab' but swanlab is not installed (pip install swanlab)")
        return []
    root = Path(os.environ.get("SWANLAB_ROOT") or os.environ.get("SWANLAB_SAVE_DIR") or Path.home() / ".swanlab")
    logged_in = bool(os.environ.get("SWANLAB_API_KEY")) or (root / ".netrc").is_file() \
        or (Path.cwd() / ".swanlab" / ".netrc").is_file()
    if choice == "auto" and not logged_in:
        return []
    if not logged_in:
        os.environ.setdefault("SWANLAB_MODE", "offline")
    os.environ.setdefault("SWANLAB_LOG_DIR", str(Path(output_dir) / "swanlog"))
    return ["swanlab"]


def tracker_callbacks(trackers: list[str], run_name: str) -> tuple[list[str], list]:
    """(report_to for TrainingArguments, extra callbacks). transformers' own SwanLab callback crashes with
    swanlab 0.10 (it logs before any run exists), so SwanLab's maintained callback is used instead."""
    if "swanlab" not in trackers:
        return trackers, []
    from swanlab.integration.transformers import SwanLabCallback

    # swanlab 0.10 reads SWANLAB_MODE and SWANLAB_LOG_DIR itself; the project goes in here (SWANLAB_PROJECT
    # would be parsed as its nested project settings and fail)
    callback = SwanLabCallback(project=SWANLAB_PROJECT, experiment_name=run_name)
    return [t for t in trackers if t != "swanlab"], [callback]


def training_arguments(cfg):
    """The Trainer's arguments. Build them before loading the model: under DeepSpeed they register its config,
    so that ZeRO-3 loads each weight straight into its partition."""
    import torch
    from transformers import TrainingArguments

    from medsft.model_loading import compute_dtype

    cuda, run_name = torch.cuda.is_available(), f"{cfg.VERSION}-{Path(cfg.OUTPUT_DIR).name}"
    report_to, _ = tracker_callbacks(resolve_report_to(cfg.REPORT_TO, cfg.OUTPUT_DIR), run_name)
    args = TrainingArguments(
        output_dir=cfg.OUTPUT_DIR, run_name=run_name,
        per_device_train_batch_size=cfg.BATCH_SIZE, per_device_eval_batch_size=cfg.EVAL_BATCH_SIZE,
        gradient_accumulation_steps=cfg.GRADIENT_ACCUMULATION, num_train_epochs=cfg.EPOCHS,
        max_steps=cfg.MAX_STEPS, learning_rate=cfg.LEARNING_RATE, lr_scheduler_type=cfg.LR_SCHEDULER,
        warmup_steps=cfg.WARMUP_RATIO, weight_decay=cfg.WEIGHT_DECAY,
        optim=optimizer_for_launcher(cfg.OPTIM, full_model=not hasattr(cfg, "LORA_R")),
        max_grad_norm=cfg.MAX_GRAD_NORM, logging_steps=cfg.LOG_STEPS, logging_first_step=True,
        eval_strategy="steps", eval_steps=cfg.EVAL_STEPS, save_strategy="steps", save_steps=cfg.SAVE_STEPS,
        save_total_limit=cfg.SAVE_TOTAL_LIMIT, bf16=cuda and compute_dtype() == torch.bfloat16,
        fp16=cuda and compute_dtype() == torch.float16, gradient_checkpointing=cfg.GRADIENT_CHECKPOINTING,
        gradient_checkpointing_kwargs={"use_reentrant": False}, report_to=report_to,
        seed=cfg.SEED, data_seed=cfg.SEED, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=not cfg.PROGRESS_BAR, use_liger_kernel=use_liger_kernel(cfg.USE_LIGER_KERNEL),
        # the loss is normalised by the trained tokens of the whole step, over accumulation and every rank
        average_tokens_across_devices=True, include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        # several processes on CPU talk over gloo; DDP needs use_cpu there, which would switch DeepSpeed and FSDP off
        **({"ddp_backend": "gloo", **({} if sharding() else {"use_cpu": True})} if not cuda and world_size() > 1
           else {}),
    )
    return args


def build_trainer(cfg, model, tokenizer, data: TrainingData, args=None):
    """The Trainer for any model (QLoRA, bf16 LoRA, or a full model), one process or many, any launcher."""
    from medsft.batching import Collator
    from medsft.trainer import (LoggingCallback, QLoRATrainer, RunClock, SetEpochCallback, ShareableCheckpoints,
                                use_readable_logging)

    args = args or training_arguments(cfg)
    _, tracker_cbs = tracker_callbacks(resolve_report_to(cfg.REPORT_TO, cfg.OUTPUT_DIR), args.run_name)
    callbacks = [LoggingCallback(Path(cfg.OUTPUT_DIR) / "metrics.jsonl"), RunClock(), ShareableCheckpoints(),
                 *tracker_cbs]
    if hasattr(data.train_set, "set_epoch"):
        callbacks.append(SetEpochCallback(data.train_set))
    trainer = QLoRATrainer(
        model=model, args=args, train_dataset=data.train_set, eval_dataset=data.val_set,
        data_collator=Collator(tokenizer.pad_token_id, cfg.PACKING), processing_class=tokenizer,
        callbacks=callbacks, best_dir=Path(cfg.OUTPUT_DIR) / "best",
    )
    use_readable_logging(trainer, cfg.PROGRESS_BAR)
    check_sharding_is_on(trainer)
    shard_tied_token_rows(trainer)
    return trainer


# ---------------------------------------------------------------------------------------------------------
# 5. train


def train(trainer, resume: str | None, cfg) -> float:
    """Train (resuming from a checkpoint if given); returns the wall time in seconds, a resumed run's included."""
    import torch

    from medsft.trainer import RunClock

    clock = next((c for c in trainer.callback_handler.callbacks if isinstance(c, RunClock)), None)
    if is_main_process():
        cfg.save(cfg.OUTPUT_DIR)
        if resume:
            trainer.load_metrics_until(json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"])
        else:  # a fresh run: nothing of an earlier, unfinished one may leak in
            (Path(cfg.OUTPUT_DIR) / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(trainer.best_dir, ignore_errors=True)
    if not resume:
        trainer.best = None
    if clock is not None and resume:
        clock.seconds_before = RunClock.seconds_in(resume)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume)
        if trainer.last_eval_step != trainer.state.global_step:
            trainer.evaluate()  # so the final weights compete for "best" too
        finish_trackers(trainer)
    except KeyboardInterrupt:
        if is_main_process():
            remove_incomplete_checkpoints(Path(cfg.OUTPUT_DIR))
        last = last_complete_checkpoint(Path(cfg.OUTPUT_DIR))
        where = f"the newest checkpoint is {last}" if last else f"no checkpoint yet (one every {cfg.SAVE_STEPS} steps)"
        exit_on_interrupt(f"interrupted at step {trainer.state.global_step}; {where}; run the same command again "
                          "to resume", show=is_main_process())
    except torch.OutOfMemoryError:
        length = "max_length" if hasattr(cfg, "MAX_LENGTH") else "max_completion_length"  # SFT, or GRPO
        raise UserError(
            f"error: out of GPU memory (batch_size={cfg.BATCH_SIZE}, {length}={getattr(cfg, length.upper())}). Lower "
            f"--batch_size (and raise --gradient_accumulation to keep the effective batch), lower --{length}, "
            "or set --gradient_checkpointing=True.") from None
    return clock.seconds() if clock is not None else time.perf_counter() - start


def finish_trackers(trainer) -> None:
    """SwanLab's callback leaves its run open until the process exits: close it, so its files are complete."""
    if trainer.is_world_process_zero() and any(type(c).__name__ == "SwanLabCallback"
                                               for c in trainer.callback_handler.callbacks):
        import swanlab

        swanlab.finish()


# ---------------------------------------------------------------------------------------------------------
# 6. results


def save_results(cfg, trainer, tokenizer, wall_time: float) -> dict:
    """final/ (the best adapter, tokenizer, settings), summary.json and loss.png in OUTPUT_DIR (main process)."""
    import torch

    from medsft.trainer import gpu_memory_peaks

    out = Path(cfg.OUTPUT_DIR)
    best = trainer.restore_best()
    final = out / "final"
    train_logs = [r for r in trainer.state.log_history if "loss" in r]
    cuda, tokens = torch.cuda.is_available(), trainer.tokens_seen
    summary = {
        "version": cfg.VERSION, "key_change": cfg.KEY_CHANGE,
        "final_train_loss": train_logs[-1]["loss"] if train_logs else None,  # the mean of the last logging window
        "best_val_loss": best["eval_loss"], "best_step": best["step"],
        "steps": trainer.state.global_step, "epochs": round(trainer.state.epoch or 0, 4),
        "wall_time_s": round(wall_time, 2), "train_tokens": tokens,
        "train_tokens_per_s": round(tokens / wall_time, 1) if wall_time else None,
        "processes": trainer.args.world_size, "sharding": sharding() or ("ddp" if trainer.args.world_size > 1 else None),
        **gpu_memory_peaks(trainer),
        "trainable_params": getattr(trainer.model, "trainable_params", None),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model_path": cfg.MODEL_PATH, "final_dir": str(final),
    }
    if trainer.is_world_process_zero():
        publish_final(trainer, tokenizer, cfg, out, final, summary)
        plotted = plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.VERSION}: {cfg.KEY_CHANGE}")
        print(f"best val loss {best['eval_loss']:.4f} at step {best['step']}; adapter in {final}/")
        print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'}" + (f", {out / 'loss.png'}" if plotted else
              " (no loss.png: matplotlib is not installed; pip install matplotlib to draw it)"), flush=True)
    trainer.accelerator.wait_for_everyone()  # final/ and summary.json are whole before any rank goes on
    return summary


def publish_final(trainer, tokenizer, cfg, out: Path, final: Path, summary: dict) -> None:
    """final/ from the best checkpoint (staged, then renamed whole), then settings.json and summary.json in OUTPUT_DIR:
    a crash leaves the previous final/ or the new one, never half of one (main process only)."""
    from medsft.trainer import check_saved_weights

    staging = out / ".final.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(trainer.best_dir, staging)
    (staging / "eval.json").unlink(missing_ok=True)
    tokenizer.save_pretrained(staging)
    cfg.save(staging)
    check_saved_weights(staging, trainer.saved_weights)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    cfg.save(out)
    write_files_atomically({out / "summary.json": json.dumps(summary, ensure_ascii=False, indent=2) + "\n"})


def plot_losses(metrics_path: Path, png_path: Path, title: str) -> bool:
    """loss.png from metrics.jsonl; False, drawing nothing, where matplotlib is not installed (a finished run
    must not end in an error over its picture: the adapter and summary.json are already written)."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [row for _, row in read_jsonl(metrics_path)] if metrics_path.exists() else []
    train = [(r["step"], r["loss"], r.get("learning_rate")) for r in records if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), height_ratios=[3, 1])
    if train:
        top.plot([s for s, _, _ in train], [l for _, l, _ in train], label="train loss", lw=1)
        bottom.plot([s for s, _, lr in train if lr is not None], [lr for _, _, lr in train if lr is not None])
    if val:
        top.plot([s for s, _ in val], [l for _, l in val], "o-", label="val loss")
    top.set_title(title)
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------
# 7. sample answer


def print_sample_answer(model, tokenizer, row: dict | str, cfg) -> str:
    """One answer to a question, or a val row's (a conversation's last one, after its earlier turns), generated the
    right way: eval mode, KV cache on, no checkpointing, and Qwen3's thinking-mode sampling (its card warns that
    greedy decoding loops in thinking mode), seeded with the run's SEED so the same run prints the same answer."""
    from medsft.generation import generate_replies, prepare_for_generation

    prepare_for_generation(model)
    row = {"question": row} if isinstance(row, str) else row
    question, history, system_prompt = row.get("question"), (), row_system_prompt(row, cfg.SYSTEM_PROMPT)
    if "messages" in row:
        system_prompt, question, history = split_conversation(row["messages"], cfg.SYSTEM_PROMPT)
    reply = generate_replies(model, tokenizer, [question], system_prompt=system_prompt, histories=[history],
                             max_new_tokens=cfg.SAMPLE_MAX_NEW_TOKENS, seed=cfg.SEED)[0]
    shown = reply.text if reply.text.strip() else f"(empty reply: {reply.new_tokens} whitespace tokens)"
    print(f"==== sample answer to a val question ====\nQuestion: {question}\n\n{shown}\n"
          f"[finish: {reply.finish_reason}, {reply.new_tokens} new tokens]", flush=True)
    return reply.text

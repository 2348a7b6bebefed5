"""A transformers Trainer whose loss skips the full-vocabulary logits, and whose eval loss is a true per-token mean."""
import json
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from medsft.batching import ANSWER, THINK
from medsft.losses import token_losses


@torch.no_grad()
def evaluate_loss(model, batches, chunk_size: int = 0, device=None) -> dict:
    """Mean token loss (and perplexity) over the trained positions, also split into think and answer parts.

    It is the same label mask as training; evaluate.py and the training-time eval both call this.
    """
    was_training = model.training
    model.eval()
    sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    for batch in batches:
        batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
        losses, segments = token_losses(model, batch, chunk_size)
        losses, segments = losses.double().cpu(), segments.cpu()
        for i, mask in enumerate((torch.ones_like(segments, dtype=torch.bool), segments == THINK, segments == ANSWER)):
            sums[i] += losses[mask].sum()
            counts[i] += int(mask.sum())
    model.train(was_training)
    means = [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]
    return {"loss": means[0], "perplexity": math.exp(means[0]), "think_loss": means[1],
            "answer_loss": means[2], "tokens": int(counts[0])}


class QLoRATrainer(Trainer):
    # compute_loss returns sum / num_items_in_batch: already the per-token mean of the whole accumulated step
    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss_chunk_size: int = 0, best_dir=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk_size, self.best_dir = loss_chunk_size, Path(best_dir)
        self.tokens_seen, self.last_eval_step = 0, None
        best_file = self.best_dir / "eval.json"
        self.best = json.loads(best_file.read_text()) if best_file.exists() else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, _ = token_losses(model, inputs, self.loss_chunk_size)
        mask = inputs.get("attention_mask")
        self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        denominator = num_items_in_batch if num_items_in_batch is not None else max(losses.numel(), 1)
        loss = losses.sum() / denominator
        return (loss, None) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        masked = getattr(self.train_dataset, "masked_terms", None)
        if masked is not None and "loss" in logs:
            logs = {**logs, "masked_terms": masked, "found_terms": self.train_dataset.found_terms}
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        loader = self.get_eval_dataloader(eval_dataset)
        result = evaluate_loss(self.model, loader, self.loss_chunk_size, self.args.device)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.items()}
        self.last_eval_step = self.state.global_step
        if metric_key_prefix == "eval" and (self.best is None or result["loss"] < self.best["eval_loss"]):
            self.best = {"step": self.state.global_step, "eval_loss": result["loss"]}
            self.save_best()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_best(self) -> None:
        """Write the adapter and its eval record beside best/, then swap: a kill never leaves a torn best/."""
        staging = self.best_dir.with_name(self.best_dir.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        self.model.save_pretrained(staging)
        (staging / "eval.json").write_text(json.dumps(self.best) + "\n")
        shutil.rmtree(self.best_dir, ignore_errors=True)
        os.replace(staging, self.best_dir)

    def restore_best(self) -> dict:
        """Put the best adapter's weights back into the model (if later steps were worse) and return its record."""
        if self.best["step"] != self.state.global_step:
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(self.best_dir / "adapter_model.safetensors"))
        return self.best

    def load_metrics_until(self, step: int) -> None:
        """On resume, drop metrics.jsonl records that the crashed run wrote after the checkpoint."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LoggingCallback):
                callback.truncate_after(step)


class LoggingCallback(TrainerCallback):
    """One readable line per logging step, and every record appended to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate_after(self, step: int) -> None:
        """Keep the records up to `step` (a torn last line from a kill is dropped too)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except (json.JSONDecodeError, AttributeError):
                continue
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        parts = [f"step {state.global_step}/{state.max_steps}", f"epoch {record['epoch']:.2f}"]
        for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("eval_think_loss", ".4f"),
                         ("eval_answer_loss", ".4f"), ("learning_rate", ".2e"), ("grad_norm", ".3f"),
                         ("masked_terms", "d")):
            if key in logs:
                parts.append(f"{key} {logs[key]:{fmt}}")
        if len(parts) > 2:
            print(" | ".join(parts), flush=True)


class ProgressBarOnly(ProgressCallback):
    """The library's progress bar, without its raw dict per log (LoggingCallback prints a readable line)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def use_readable_logging(trainer, progress_bar: bool) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if progress_bar:
        trainer.add_callback(ProgressBarOnly)


class SetEpochCallback(TrainerCallback):
    """Tells a dataset which epoch is starting (v3 re-draws its masks every epoch)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_train_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "reset_counts"):
            self.dataset.reset_counts()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int((state.epoch or 0) + 1e-6))

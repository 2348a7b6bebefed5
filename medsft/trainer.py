"""A transformers Trainer whose loss goes through the model's forward (DDP, DeepSpeed, FSDP) and whose eval
loss is a true per-token mean over every rank's share of the val set."""
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback

from medsft.batching import ANSWER, NO_THINK, THINK
from medsft.errors import UserError, interrupts_held
from medsft.losses import token_losses
from medsft.records import make_shareable


@torch.no_grad()
def loss_sums(model, batches, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sums, token counts) over the trained positions: all of them, the think part, the answer part, and
    the replies without reasoning."""
    was_training = model.training
    model.eval()
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights for CPU inference in eval mode, and training after that backprops
        # through a kernel with no autograd (wrong gradients): evaluate with the training layout
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    sums, counts = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    for batch in batches:
        batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
        losses, segments = token_losses(model, batch)
        losses, segments = losses.double().cpu(), segments.cpu()
        for i, mask in enumerate((torch.ones_like(segments, dtype=torch.bool), segments == THINK, segments == ANSWER,
                                  segments == NO_THINK)):
            sums[i] += losses[mask].sum()
            counts[i] += int(mask.sum())
    model.train(was_training)
    return sums, counts


def loss_metrics(sums: torch.Tensor, counts: torch.Tensor) -> dict:
    means = [float(s / c) if c else float("nan") for s, c in zip(sums.tolist(), counts.tolist())]
    metrics = {"loss": means[0], "perplexity": math.exp(means[0]), "think_loss": means[1],
               "answer_loss": means[2], "tokens": int(counts[0])}
    if counts[3]:  # replies without reasoning (NO_THINK_FRACTION, or rows with an empty think)
        metrics["no_think_answer_loss"] = means[3]
    return metrics


def evaluate_loss(model, batches, device=None) -> dict:
    """Mean token loss (and perplexity) over the trained positions, also split into think and answer parts (of
    replies that think) and no-think answer (replies without reasoning: empty think block, answer, end token).

    It is the same label mask as training; evaluate.py and the training-time eval both use it.
    """
    return loss_metrics(*loss_sums(model, batches, device))


def saved_names_and_shapes(model) -> dict[str, tuple]:
    """Every trainable tensor as the saved folder names it (PEFT drops the adapter name and `modules_to_save.`),
    with its whole shape (under ZeRO-3 a process holds only its partition)."""
    adapter = model.active_adapter if hasattr(model, "peft_config") else None
    expected = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            if adapter:
                name = ".".join(part for part in name.split(".") if part not in (adapter, "modules_to_save"))
            expected[name] = tuple(getattr(param, "ds_shape", param.shape))
    return expected


def check_saved_weights(folder, expected: dict[str, tuple]) -> None:
    """Stop when a saved best/ or final/ lacks a trained tensor or holds one of the wrong shape (reads headers only).

    A sharded save can "succeed" and write an empty adapter (FSDP1 + PEFT 0.21 wrote 0 tensors): never ship one.
    """
    from safetensors import safe_open

    saved = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            saved.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    missing = [name for name in expected if name not in saved]
    wrong = [f"{name} {list(saved[name])} instead of {list(expected[name])}"
             for name in expected if name in saved and saved[name] != expected[name]]
    if missing or wrong:
        problem = (f"lacks {len(missing)} of the {len(expected)} trained tensors ({', '.join(missing[:3])}"
                   f"{', ...' if len(missing) > 3 else ''})" if missing else f"holds {', '.join(wrong[:3])}")
        raise UserError(f"error: the saved weights in {folder} are incomplete: it {problem}; the save under this "
                        "launcher lost them (nothing was shipped)")


class QLoRATrainer(Trainer):
    """The Trainer's own loss (the forward with labels and num_items_in_batch), our eval, and best/ kept on disk."""

    def __init__(self, *args, best_dir=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.best_dir, self.last_eval_step = Path(best_dir), None
        self.saved_weights = saved_names_and_shapes(self.model)  # what best/ and final/ must hold
        best_file = self.best_dir / "eval.json"
        self.best = json.loads(best_file.read_text()) if best_file.exists() else None

    @property
    def tokens_seen(self) -> int:
        """Input tokens trained so far, over every rank, carried across a resume in trainer_state.json."""
        return self.state.num_input_tokens_seen

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: the forward needs the wrapped model, and every rank must join each forward."""
        return self.is_fsdp_enabled or self.is_deepspeed_enabled

    def create_optimizer(self, model=None):
        """The Trainer's optimizer; a fully trained embedding (EMBEDDING_MODE="full") gets its own param group
        at EMBEDDING_LEARNING_RATE, before the scheduler is built, so the schedule scales both alike."""
        optimizer = super().create_optimizer(model)
        lr = getattr(self.model, "embedding_learning_rate", None)
        if lr is None or any(group.get("embedding") for group in optimizer.param_groups):
            return optimizer
        embedding = {id(p) for n, p in self.model.named_parameters() if p.requires_grad and "modules_to_save" in n}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in embedding]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in embedding]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"},
                                           "params": moved, "lr": lr, "embedding": True})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "segments"}  # eval's think/answer split, not a model input
        inputs["use_cache"] = False  # with a KV cache, packed examples would see each other
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs, *args, **kwargs):
        masked = getattr(self.train_dataset, "masked_terms", None)
        if masked is not None and "loss" in logs:  # every rank logs the train loss at the same step
            counts = torch.tensor([masked, self.train_dataset.found_terms], device=self.args.device)
            masked, found = self.accelerator.reduce(counts, "sum").tolist()
            logs = {**logs, "masked_terms": int(masked), "found_terms": int(found)}
        super().log(logs, *args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        rank, world = self.args.process_index, self.args.world_size
        shard, size = list(dataset)[rank::world], self.args.per_device_eval_batch_size
        batches = [self.data_collator(shard[i:i + size]) for i in range(0, len(shard), size)]
        model = self.model_wrapped  # DDP, FSDP or DeepSpeed: eval through the same wrapper as training
        sums, counts = loss_sums(model, batches, self.args.device)
        if self.sharded:  # a rank with fewer batches still joins every forward's all-gather
            for _ in range(len(batches), math.ceil(math.ceil(len(dataset) / world) / size)):
                loss_sums(model, [self.data_collator([dataset[0]])], self.args.device)
        if world > 1:
            sums = self.accelerator.reduce(sums.to(self.args.device), "sum").cpu()
            counts = self.accelerator.reduce(counts.to(self.args.device), "sum").cpu()
        result = loss_metrics(sums, counts)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in result.items()}
        self.last_eval_step = self.state.global_step
        if metric_key_prefix == "eval" and (self.best is None or result["loss"] < self.best["eval_loss"]):
            self.best = {"step": self.state.global_step, "eval_loss": result["loss"]}
            self.save_best()
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def save_best(self) -> None:
        """Write the adapter and its eval record beside best/, then swap: a kill never leaves a torn best/.

        Every rank calls this (FSDP and DeepSpeed gather the weights collectively); only the main process writes.
        """
        main = self.is_world_process_zero()
        staging = self.best_dir.with_name(self.best_dir.name + ".tmp")
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.save_model(str(staging), _internal_call=True)
        if main:
            check_saved_weights(staging, self.saved_weights)
            (staging / "training_args.bin").unlink(missing_ok=True)
            (staging / "eval.json").write_text(json.dumps(self.best) + "\n")
            make_shareable(staging)
            shutil.rmtree(self.best_dir, ignore_errors=True)
            os.replace(staging, self.best_dir)
        self.accelerator.wait_for_everyone()  # nobody reads best/ before it is whole

    def restore_best(self) -> dict:
        """Put the best adapter's weights back into the model (if later steps were worse) and return its record."""
        self.accelerator.wait_for_everyone()
        if self.best["step"] == self.state.global_step or self.sharded:
            return self.best
        if hasattr(self.model, "peft_config"):
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(self.best_dir / "adapter_model.safetensors"))
        else:  # a full model: the Trainer's own loader reads single-file and sharded weights alike
            self._load_from_checkpoint(str(self.best_dir))
        return self.best

    def load_metrics_until(self, step: int) -> None:
        """On resume, drop metrics.jsonl records that the crashed run wrote after the checkpoint."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LoggingCallback) and self.is_world_process_zero():
                callback.truncate_after(step)


class LoggingCallback(TrainerCallback):
    """One readable line per logging step, and every record appended to metrics.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.device_used_max = None  # GiB the whole GPU holds (torch.cuda.mem_get_info), the most seen at a log

    def sample_device_memory(self) -> float | None:
        """Device-wide used memory on CUDA: torch's own, plus what its counters never see (a paged optimizer's
        managed memory, the CUDA context; and any other process on that GPU)."""
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        used = round((total - free) / 2**30, 3)
        self.device_used_max = max(self.device_used_max or 0.0, used)
        return used

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

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last window is logged too, so final_train_loss is its mean

    def write_record(self, state, logs: dict, **extra) -> dict:
        """One metrics.jsonl line: the step, the epoch, the logs, `extra` and, on CUDA, the device-wide used memory."""
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs, **extra}
        used = self.sample_device_memory()
        if used is not None:
            record["gpu_device_used_gib"] = used
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with interrupts_held(), self.path.open("a", encoding="utf-8") as f:  # a Ctrl-C waits for the whole line
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return record

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = self.write_record(state, logs)
        parts = [f"step {state.global_step}/{state.max_steps}", f"epoch {record['epoch']:.2f}"]
        for key, fmt in (("loss", ".4f"), ("eval_loss", ".4f"), ("eval_think_loss", ".4f"),
                         ("eval_answer_loss", ".4f"), ("eval_no_think_answer_loss", ".4f"),
                         ("learning_rate", ".2e"), ("grad_norm", ".3f"),
                         ("masked_terms", "d")):
            if key in logs:
                parts.append(f"{key} {logs[key]:{fmt}}")
        if len(parts) > 2:
            from tqdm.auto import tqdm

            tqdm.write(" | ".join(parts))  # above the progress bar, never on its line


def gpu_memory_peaks(trainer) -> dict:
    """summary.json's peak GPU memory (GiB, None off CUDA): torch's allocated and reserved peaks, and the device-wide
    use (mem_get_info at each logging step), which adds a paged optimizer's states and the CUDA context."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "peak_gpu_device_used_gib": max((c.device_used_max for c in trainer.callback_handler.callbacks
                                         if isinstance(c, LoggingCallback) and c.device_used_max), default=None),
    }


class RunClock(TrainerCallback, ExportableState):
    """Training seconds, saved in every checkpoint's trainer_state.json so a resumed run's summary covers it all."""

    def __init__(self, seconds_before: float = 0.0):
        self.seconds_before, self.started = seconds_before, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seconds": round(self.seconds(), 3)}}

    @staticmethod
    def seconds_in(checkpoint) -> float:
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("stateful_callbacks", {})
        return float(saved.get("RunClock", {}).get("attributes", {}).get("seconds", 0.0))


class ShareableCheckpoints(TrainerCallback):
    """Checkpoints get the umask's file modes (safetensors writes owner-only files), like everything else we write."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            make_shareable(folder)


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
    """Tells a dataset which epoch is starting (v3 re-draws its masks every epoch; every rank draws the same)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_train_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "reset_counts"):
            self.dataset.reset_counts()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int((state.epoch or 0) + 1e-6))

"""The output folder of a training run: resume it, refuse a resume that would change the run, or start afresh.

A run killed or stopped leaves checkpoint-N folders; the same command continues from the newest complete one.
A finished run is never overwritten without --overwrite=True, and a resume never silently changes what is trained.
"""
import hashlib
import json
import math
import shutil
from pathlib import Path

from medsft.distributed import is_main_process, world_size
from medsft.errors import UserError


def planned_steps(cfg, n_train: int) -> int:
    """The optimizer steps of the whole run, under any number of processes (each takes every n-th batch)."""
    if cfg.MAX_STEPS > 0:
        return cfg.MAX_STEPS
    batches = math.ceil(math.ceil(n_train / cfg.BATCH_SIZE) / world_size())
    return math.ceil(cfg.EPOCHS * max(1, math.ceil(batches / cfg.GRADIENT_ACCUMULATION)))


def finished_run(cfg) -> Path | None:
    """OUTPUT_DIR/final when the same command has already finished this run; else None (train, or resume).

    Checked before anything is printed or loaded: the settings that decide what is trained, and the data,
    must be the saved ones (a longer MAX_STEPS or EPOCHS extends the run instead). Every process decides alike.
    """
    out = Path(cfg.OUTPUT_DIR)
    if cfg.OVERWRITE or cfg.DRY_RUN or cfg.RESUME != "auto" or not (out / "final").is_dir() \
            or not (out / "summary.json").is_file() or not (out / "settings.json").is_file():
        return None
    try:
        saved = read_saved_settings(out / "settings.json", cfg)
        new = cfg.as_dict() | {"DATA_SHA256": fingerprint_of(cfg)}
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable or missing data: the usual checks name the problem
    if any(saved.get(name) != new.get(name) for name in set(saved) | set(new) if name not in RESUME_MAY_CHANGE):
        return None
    best = summary.get("best_val_loss")
    print(f"{out} holds this run, finished ({summary.get('steps')} steps"
          + (f", best val loss {best:.4f} at step {summary.get('best_step')}" if isinstance(best, float) else "")
          + f"); the result is in {out / 'final'}/. Nothing to do; --overwrite=True trains it again", flush=True)
    return out / "final"


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest checkpoint-N with its trainer_state.json (a run killed while saving leaves one without)."""
    numbered = [(int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    complete = [p for _, p in sorted(numbered, reverse=True) if (p / "trainer_state.json").is_file()]
    return str(complete[0]) if complete else None


def remove_incomplete_checkpoints(out: Path) -> None:
    """Delete checkpoint-N folders without trainer_state.json: a save cut short (by Ctrl-C) that nothing can resume."""
    for path in out.glob("checkpoint-*"):
        if path.is_dir() and not (path / "trainer_state.json").is_file():
            shutil.rmtree(path, ignore_errors=True)


# Settings a resumed run may change: they change how the run is watched and saved, or how fast it runs, never
# what it trains (the speed options give the same loss and update). Anything else must match the checkpoint's.
RESUME_MAY_CHANGE = {"EVAL_STEPS", "EVAL_BATCH_SIZE", "SAVE_STEPS", "SAVE_TOTAL_LIMIT", "LOG_STEPS", "REPORT_TO",
                     "PROGRESS_BAR", "RESUME", "OVERWRITE", "DRY_RUN", "SAMPLE_MAX_NEW_TOKENS", "OUTPUT_DIR",
                     "PACKING", "LOSS_CHUNK_SIZE", "GRADIENT_CHECKPOINTING", "ATTN_IMPLEMENTATION", "USE_LIGER_KERNEL",
                     "GPU_MEMORY_GB"}
RESUME_MAY_EXTEND = ("MAX_STEPS", "EPOCHS")  # a longer run continues the same one


def read_saved_settings(path: Path, cfg) -> dict:
    """A run's settings.json, with the settings added since it was saved filled in as that run behaved."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    as_it_behaved = {"MASK_POLICY": "seed", "NO_THINK_FRACTION": 0.0,
                     # v2/v3 used to train the whole embedding at the LoRA rate
                     "EMBEDDING_MODE": "full", "EMBEDDING_LEARNING_RATE": saved.get("LEARNING_RATE")}
    return {name: value for name, value in as_it_behaved.items() if hasattr(cfg, name)} | saved


def data_fingerprint(data_dir) -> str:
    """sha256 of train.jsonl and val.jsonl: a resumed run must train on the same data."""
    digest = hashlib.sha256()
    for name in ("train.jsonl", "val.jsonl"):
        digest.update((Path(data_dir) / name).read_bytes())
    return digest.hexdigest()


def fingerprint_of(cfg) -> str:
    """The run's data fingerprint: DATA_DIR's split, or what the script hands in as cfg._data_fingerprint (GRPO's
    exam files)."""
    custom = getattr(cfg, "_data_fingerprint", None)
    return custom(cfg) if custom else data_fingerprint(cfg.DATA_DIR)


def plan_output_dir(cfg, n_train: int) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; a finished run is never silently overwritten,
    and a resume never silently changes what the run trains."""
    out = Path(cfg.OUTPUT_DIR)
    cfg.DATA_SHA256 = fingerprint_of(cfg)  # saved in settings.json with the constants
    last = last_complete_checkpoint(out)
    if cfg.OVERWRITE:
        if not is_main_process():  # the main process clears the folder; the others train into it
            return None
        for path in out.glob("checkpoint-*"):
            shutil.rmtree(path)
        for name in ("final", "best", "metrics.jsonl", "summary.json", "loss.png"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return None
    resume = None
    if cfg.RESUME not in ("auto", "never"):
        resume = cfg.RESUME
    elif cfg.RESUME == "auto" and last:
        step = json.loads((Path(last) / "trainer_state.json").read_text())["global_step"]
        if step < planned_steps(cfg, n_train):
            resume = last
    if resume:
        check_resume_settings(cfg, out / "settings.json")
        step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
        print(f"resuming from {resume} (step {step})")
        return resume
    if (out / "final").exists() or last:
        raise UserError(f"error: {out} already holds a run ({'final/' if (out / 'final').exists() else last}) "
                        "and there is nothing to resume; pass --overwrite=True to replace it, or another --output_dir")
    return None


def check_resume_settings(cfg, saved_path: Path) -> None:
    """Stop when the new settings would change what the resumed run trains; say so when it is only extended."""
    if not saved_path.is_file():
        return
    saved, new = read_saved_settings(saved_path, cfg), cfg.as_dict()
    changed = [name for name in sorted(set(saved) | set(new))
               if name not in RESUME_MAY_CHANGE and name not in RESUME_MAY_EXTEND and saved.get(name) != new.get(name)]
    if changed:
        listed = ", ".join(f"{name.lower()} {saved.get(name)!r} → {new.get(name)!r}" for name in changed)
        raise UserError(f"error: {cfg.OUTPUT_DIR} holds a run trained with other settings ({listed}); resuming would "
                        "mix the two. Restore the old values to continue it, or pass --overwrite=True to start afresh "
                        "(or use another --output_dir)")
    extended = [f"{name.lower()} {saved[name]!r} → {new[name]!r}" for name in RESUME_MAY_EXTEND
                if name in saved and saved[name] != new[name]]
    if extended:
        print(f"extending the run ({', '.join(extended)}); the learning-rate schedule now spans the new length")

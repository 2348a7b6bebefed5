"""The recipes the benchmark trains: ONE table, RECIPES. A new recipe, ours or a peer's, is one entry.

Every recipe starts from one of our scripts' constants, read through parse_settings as its command line would
give them, so all of them share the model, the data, MAX_LENGTH, the LoRA shape (r 64, alpha 16, the seven
projections) and the effective batch (4 x 4 = 16 examples) unless the entry changes them. The runner named in
the entry turns those settings into a transformers Trainer, ready to train; bench/measure.py times it.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from medsft.settings import check_settings, parse_settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Recipe:
    runner: str                                    # "ours": the LoRA scripts' pipeline; "full": train.py's; "trl"
    script: str                                    # the script whose constants it starts from
    overrides: dict = field(default_factory=dict)  # constants changed from the script's
    about: str = ""                                # one line for bench/README.md and the report
    needs_cuda: bool = False                       # on CPU it is recorded as skipped, not run


RECIPES = {  # in the order a run measures them: the comparisons that matter most first
    "v1": Recipe("ours", "train_lora", about="train_lora.py as shipped"),
    "trl": Recipe("trl", "train_lora", {"USE_LIGER_KERNEL": False},
                  "TRL SFTTrainer, v1's settings: NF4 QLoRA, padding_free, completion-only loss"),
    "trl_liger": Recipe("trl", "train_lora", {"USE_LIGER_KERNEL": True},
                        "the same with use_liger_kernel=True (Liger's kernels are CUDA only)", needs_cuda=True),
    "v2": Recipe("ours", "train_lora2", about="train_lora2.py as shipped (EMBEDDING_MODE 'tokens')"),
    "v2_full_embedding": Recipe("ours", "train_lora2", {"EMBEDDING_MODE": "full"},
                                "v2 training every one of the 151,936 embedding rows (EMBEDDING_MODE 'full')"),
    "v3": Recipe("ours", "train_lora3", about="train_lora3.py as shipped"),
    "full": Recipe("full", "train", about="train.py as shipped: every weight, bf16, 8-bit AdamW"),
    "original": Recipe("ours", "train_lora", {
        "PACKING": False, "USE_LIGER_KERNEL": False, "BATCH_SIZE": 4, "GRADIENT_ACCUMULATION": 4,
        "GRADIENT_CHECKPOINTING": True, "LOAD_IN_4BIT": True, "OPTIM": "paged_adamw_8bit"},
        "the originals' v1: 4 x 4 micro-batches padded to the longest, full-vocabulary logits"),
    "bf16_lora": Recipe("ours", "train_lora", {"LOAD_IN_4BIT": False}, "v1 on a bf16 base (no NF4)"),
}
ADAPTER_RECIPE = "v3"  # its adapter is saved and used for the inference measurement


def recipe_problems(names) -> list[str]:
    """What the named recipes need that is missing (checked with the settings, before anything slow)."""
    import importlib.util

    import torch

    problems = [f"unknown config {name!r}; configs: {', '.join(RECIPES)}" for name in names if name not in RECIPES]
    runners = {RECIPES[name].runner for name in names if name in RECIPES}
    if "trl" in runners and importlib.util.find_spec("trl") is None:
        problems.append("the trl configs need TRL: pip install 'trl>=1.16,<2'")
    liger = [name for name in names if name in RECIPES and RECIPES[name].overrides.get("USE_LIGER_KERNEL")]
    if liger and torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is None:
        problems.append(f"config(s) {', '.join(liger)} need Liger's kernels: pip install liger-kernel")
    return problems


def recipe_settings(cfg, name: str, model_dir, paths):
    """(Settings, argv): the recipe's script constants through parse_settings, as its command line would give."""
    import importlib

    recipe = RECIPES[name]
    module = importlib.import_module(recipe.script)
    values = {"MODEL_PATH": str(model_dir), "DATA_DIR": str(paths.data), "OUTPUT_DIR": str(paths.runs / name),
              "MAX_LENGTH": cfg.MAX_LENGTH, "MAX_STEPS": cfg.WARMUP_STEPS + cfg.STEPS,
              "EVAL_STEPS": 10**6, "SAVE_STEPS": 10**6, "LOG_STEPS": 1, "REPORT_TO": "none", "PROGRESS_BAR": False,
              "RESUME": "never", "OVERWRITE": True}
    if hasattr(module, "LEXICON_PATH"):
        values["LEXICON_PATH"] = str(ROOT / "data" / "medical_terms.tsv")
    values |= recipe.overrides
    if cfg.BATCH_SIZE > 0:
        values["BATCH_SIZE"] = cfg.BATCH_SIZE
    if cfg.GRADIENT_ACCUMULATION > 0:
        values["GRADIENT_ACCUMULATION"] = cfg.GRADIENT_ACCUMULATION
    argv = [f"--{k.lower()}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]
    return parse_settings(vars(module), argv), [recipe.script + ".py", *argv]


def load_recipe_data(settings, tokenizer):
    """The training data as the recipe's script loads it (v3: the questions masked afresh at every draw)."""
    from medsft.training_data import load_training_data

    data = load_training_data(settings, tokenizer)
    if hasattr(settings, "MASK_PROB"):  # as train_lora3.main
        from medsft.masking import MaskedQuestionDataset

        data.train_set = MaskedQuestionDataset(data.train_rows, tokenizer, settings, data.train_examples)
    return data


def build_recipe_trainer(name: str, settings, model_dir, tokenizer, data):
    """The recipe's Trainer, through its runner, on data from load_recipe_data."""
    runner = {"ours": build_lora_trainer, "full": build_full_trainer, "trl": build_trl_trainer}[RECIPES[name].runner]
    return runner(settings, str(model_dir), tokenizer, data)


# ---------------------------------------------------------------------------------------------------------
# the runners


def build_lora_trainer(settings, model_dir: str, tokenizer, data):
    """train_lora*.py's pipeline: our data, our LoRA model, our Trainer (v3: questions masked at every draw)."""
    from medsft.training import build_trainer, check_training_settings, load_lora_model

    problems = check_training_settings(settings)
    if hasattr(settings, "MASK_PROB"):
        from medsft.masking import check_masking_settings

        problems += check_masking_settings(settings)
    check_settings(problems)
    model = load_lora_model(model_dir, settings, data)  # EMBEDDING_MODE "tokens": the rows of data's tokens
    return build_trainer(settings, model, tokenizer, data)


def build_full_trainer(settings, model_dir: str, tokenizer, data):
    """train.py's pipeline: every weight trainable, the bf16-safe low-bit AdamW."""
    from medsft.full_finetune import check_full_finetune_settings, load_full_model, use_full_model_training
    from medsft.training import build_trainer, check_training_settings

    check_settings(check_training_settings(settings) + check_full_finetune_settings(settings))
    model = load_full_model(model_dir, settings)
    trainer = build_trainer(settings, model, tokenizer, data)
    use_full_model_training(trainer, settings)
    return trainer


def build_trl_trainer(settings, model_dir: str, tokenizer, data):
    """TRL's SFTTrainer as its docs set it up, with our settings: the same NF4 base, LoRA shape, batch and optimizer.

    It is fed our examples pre-tokenized, with a completion mask over the reply: the very tokens our recipes
    train (long thinks shortened the same way), and only the reply is trained. TRL does the rest itself:
    the k-bit preparation and LoRA (peft_config), padding_free batches, its loss, and Liger when asked.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from medsft.chat_format import IGNORE_INDEX
    from medsft.model_loading import compute_dtype, load_base_model
    from medsft.training import check_training_settings

    check_settings(check_training_settings(settings))
    rows = [{"input_ids": e["input_ids"], "completion_mask": [int(label != IGNORE_INDEX) for label in e["labels"]]}
            for e in data.train_set]
    model = load_base_model(model_dir, settings.LOAD_IN_4BIT, settings.ATTN_IMPLEMENTATION)
    lora = LoraConfig(r=settings.LORA_R, lora_alpha=settings.LORA_ALPHA, lora_dropout=settings.LORA_DROPOUT,
                      target_modules=list(settings.TARGET_MODULES), bias="none", task_type="CAUSAL_LM")
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=settings.OUTPUT_DIR, per_device_train_batch_size=settings.BATCH_SIZE,
        gradient_accumulation_steps=settings.GRADIENT_ACCUMULATION, max_steps=settings.MAX_STEPS,
        learning_rate=settings.LEARNING_RATE, lr_scheduler_type=settings.LR_SCHEDULER,
        warmup_steps=settings.WARMUP_RATIO, weight_decay=settings.WEIGHT_DECAY, optim=settings.OPTIM,
        max_grad_norm=settings.MAX_GRAD_NORM, bf16=cuda and compute_dtype() == torch.bfloat16,
        fp16=cuda and compute_dtype() == torch.float16, gradient_checkpointing=settings.GRADIENT_CHECKPOINTING,
        gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=settings.USE_LIGER_KERNEL,
        # the examples already fit MAX_LENGTH (long thinks shortened as ours); padding_free needs max_length=None then
        max_length=None, padding_free=True, packing=False, completion_only_loss=True,
        logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none", seed=settings.SEED,
        data_seed=settings.SEED, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        disable_tqdm=not settings.PROGRESS_BAR,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    trainer.model.trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return trainer

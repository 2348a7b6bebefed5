"""Full fine-tuning: every weight of Qwen3 trained in bf16, in 16 GB for Qwen3-1.7B (derived, not measured).

    python data.py && python train.py
    python train.py --dry_run=True                              # data stats, first example, will it fit? (no weights)
    python train.py --model_path=Qwen/Qwen3-0.6B --max_length=1024 --output_dir=output/0.6b-full
    python train.py --max_steps=400                             # after a crash, the same command resumes
    torchrun --nproc_per_node 2 train.py                        # DDP: each GPU holds the whole model
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train.py   # weights partitioned (ZeRO-3)
    python inference_lora.py --model_path=output/qwen3-1.7b-full/final --adapter_path= -q "什么是高血压？"
"""
from medsft import chat_format
from medsft.distributed import quiet_other_ranks
from medsft.full_finetune import check_full_finetune_settings, load_full_model, use_full_model_training
from medsft.memory_estimate import print_memory_estimate
from medsft.model_loading import load_tokenizer, resolve_model_path, warn_if_cpu
from medsft.resume import finished_run, plan_output_dir
from medsft.settings import check_settings, parse_settings
from medsft.training import (build_trainer, check_training_settings, print_sample_answer, save_results, train,
                             training_arguments)
from medsft.training_data import load_training_data, show_data_preview

# -----------------------------------------------------------------------------
# version
VERSION = "full"                           # written to summary.json for compare.py
KEY_CHANGE = "full fine-tuning (bf16, 8-bit AdamW, stochastic rounding)"
# model
MODEL_PATH = "Qwen/Qwen3-1.7B"             # a local folder, or a ModelScope / Hugging Face id (downloaded once)
LOAD_IN_4BIT = False                       # must stay False: 4-bit weights cannot be trained (evaluate.py reads it)
FP32_WEIGHTS = False                       # True: fp32 weights, exact updates, ~2x the memory (GPUs without bf16)
ATTN_IMPLEMENTATION = "sdpa"               # "sdpa" keeps packed examples apart; "flash_attention_2" if installed
# data
DATA_DIR = "data"                          # train.jsonl and val.jsonl from data.py
MAX_LENGTH = 2048                          # tokens; p99 of the dataset is 1,443, max 3,150
LONG_EXAMPLES = "shorten_think"            # longer examples lose the end of their think ("drop" drops them); never the answer
SYSTEM_PROMPT = chat_format.SYSTEM_PROMPT   # the originals' prompt; inference_lora.py uses the same
NO_THINK_FRACTION = 0.0                    # share of examples re-drawn each epoch as replies without reasoning; try 0.25
# optimisation
EPOCHS = 2.0                               # passes over train.jsonl (ignored when MAX_STEPS > 0); 1-3 is usual
MAX_STEPS = -1                             # > 0 stops after this many optimizer steps
BATCH_SIZE = 4                             # examples per micro-batch
GRADIENT_ACCUMULATION = 4                  # micro-batches per optimizer step: 4 x 4 = 16 examples
LEARNING_RATE = 5e-6                       # peak learning rate, as the originals' full fine-tune
LR_SCHEDULER = "cosine"                    # decay after warmup: linear, cosine, constant, ...
WARMUP_RATIO = 0.05                        # fraction of the steps spent warming up (Adam's early steps are noisy)
WEIGHT_DECAY = 0.0                         # AdamW weight decay
OPTIM = "adamw_torch_8bit"                 # torchao's 8-bit AdamW (2 bytes of state per weight); or adamw_torch_4bit
BF16_STOCHASTIC_ROUND = True               # round each bf16 weight update up or down at random: lr 5e-6 steps add up
MAX_GRAD_NORM = 1.0                        # gradient clipping
SEED = 42                                  # data order, dropout and stochastic rounding
# speed and memory
PACKING = True                             # micro-batch examples in one row, no padding (same loss as padded)
USE_LIGER_KERNEL = True                    # CUDA + `pip install liger-kernel`: fused loss, no full-vocabulary logits
GRADIENT_CHECKPOINTING = True              # recompute activations in backward: much less memory, slower
GPU_MEMORY_GB = 0.0                        # the dry run's budget: 0 = the visible GPU's memory, or 16 without one
# evaluation and checkpoints
EVAL_STEPS = 50                            # val loss every this many steps (and at the end)
EVAL_BATCH_SIZE = 4                        # examples per eval micro-batch
SAVE_STEPS = 50                            # checkpoint-N every this many steps, for resuming
SAVE_TOTAL_LIMIT = 2                       # checkpoints kept
LOG_STEPS = 10                             # one progress line every this many steps
# output
OUTPUT_DIR = "output/qwen3-1.7b-full"      # final/ (best model), summary.json, metrics.jsonl, loss.png
RESUME = "auto"                            # "auto": continue from the newest checkpoint; "never"; or a checkpoint folder
OVERWRITE = False                          # True replaces a finished run in OUTPUT_DIR
REPORT_TO = "auto"                         # "auto": SwanLab if logged in, else nothing; "swanlab"; "tensorboard"; "none"
PROGRESS_BAR = True                        # the library's progress bar
DRY_RUN = False                            # True: data stats, the first example and the memory estimate, then stop
SAMPLE_MAX_NEW_TOKENS = 1024               # tokens of the sample answer printed at the end
# -----------------------------------------------------------------------------


def main(argv=None):
    # ========== 1. Settings: every problem reported before the model loads ==========
    quiet_other_ranks()  # several processes (torchrun, accelerate launch): only the main one prints
    cfg = parse_settings(globals(), argv)
    if finished_run(cfg):  # the same command again: say where the result is, before any long printout
        return None
    cfg.print("full fine-tuning settings")
    check_settings(check_training_settings(cfg) + check_full_finetune_settings(cfg))

    # ========== 2. Tokenizer and data ==========
    model_path = resolve_model_path(cfg.MODEL_PATH, tokenizer_only=cfg.DRY_RUN)
    tokenizer = load_tokenizer(model_path)
    data = load_training_data(cfg, tokenizer)
    show_data_preview(tokenizer, data, cfg)
    if cfg.DRY_RUN:
        return {"data": data, "estimate": print_memory_estimate(model_path, cfg, data)}
    resume = plan_output_dir(cfg, len(data.train_set))

    # ========== 3. The whole model in bf16, every weight trainable ==========
    warn_if_cpu(cfg.LOAD_IN_4BIT)
    args = training_arguments(cfg)  # first: under DeepSpeed ZeRO-3 the model then loads partitioned
    model = load_full_model(model_path, cfg)

    # ========== 4. Trainer (with the stochastic-rounding optimizer; best/ holds the whole model) ==========
    trainer = build_trainer(cfg, model, tokenizer, data, args)
    use_full_model_training(trainer, cfg)

    # ========== 5. Train (resumes from the newest checkpoint after a crash) ==========
    wall_time = train(trainer, resume, cfg)

    # ========== 6. Save the best model, summary.json and loss.png ==========
    summary = save_results(cfg, trainer, tokenizer, wall_time)

    # ========== 7. One sample answer to a val question ==========
    print_sample_answer(model, tokenizer, data.val_rows[0], cfg)
    return {"data": data, "trainer": trainer, "summary": summary}


if __name__ == "__main__":
    main()

"""QLoRA v3: v2 + dynamic medical-term masking of the questions, re-drawn every epoch.

    python data.py && python train_lora3.py
    python train_lora3.py --dry_run=True                         # data stats, first example, will it fit? (no weights)
    python train_lora3.py --model_path=Qwen/Qwen3-0.6B --max_length=1024 --output_dir=output/0.6b-v3
    python train_lora3.py --max_steps=400                        # after a crash, the same command resumes
    torchrun --nproc_per_node 2 train_lora3.py                   # 2 GPUs, data parallel (README: More than one GPU)
    python train_lora3.py --mask_style=typed                     # [药物] instead of [MASK]
    python train_lora3.py --mask_style=progressive               # [MASK] in epoch 1, [药物] from epoch 2 on
    python train_lora3.py --mask_policy=absent_from_reply --dry_run=True   # mask only terms the reply does not restate
"""
from medsft import chat_format
from medsft.distributed import quiet_other_ranks
from medsft.masking import MaskedQuestionDataset, check_masking_settings, print_restated_terms
from medsft.memory_estimate import print_memory_estimate
from medsft.model_loading import load_tokenizer, resolve_model_path, warn_if_cpu
from medsft.resume import finished_run, plan_output_dir
from medsft.settings import check_settings, parse_settings
from medsft.training import (build_trainer, check_training_settings, load_lora_model, print_sample_answer,
                             save_results, train, training_arguments)
from medsft.training_data import load_training_data, show_data_preview

# -----------------------------------------------------------------------------
# version
VERSION = "v3"                             # written to summary.json for compare.py
KEY_CHANGE = "v2 + dynamic medical-term masking"
# model
MODEL_PATH = "Qwen/Qwen3-1.7B"             # a local folder, or a ModelScope / Hugging Face id (downloaded once)
LOAD_IN_4BIT = True                        # QLoRA: NF4 base with double quantisation, bf16 compute; False = bf16 LoRA
ATTN_IMPLEMENTATION = "sdpa"               # "sdpa" keeps packed examples apart; "flash_attention_2" if installed
# data
DATA_DIR = "data"                          # train.jsonl and val.jsonl from data.py
MAX_LENGTH = 2048                          # tokens; p99 of the dataset is 1,443, max 3,150
LONG_EXAMPLES = "shorten_think"            # longer examples lose the end of their think ("drop" drops them); never the answer
SYSTEM_PROMPT = chat_format.SYSTEM_PROMPT   # the originals' prompt; inference_lora.py uses the same
NO_THINK_FRACTION = 0.0                    # share of examples re-drawn each epoch as replies without reasoning; try 0.25
# medical-term masking
LEXICON_PATH = "data/medical_terms.tsv"    # term<TAB>category: 疾病, 症状, 药物, 检查, 解剖
MASK_PROB = 0.15                           # chance that each lexicon term in a question is masked, per draw
MASK_STYLE = "mask"                        # "mask": [MASK]; "typed": [药物]; "progressive": [MASK] in epoch 1, [药物] after
MASK_POLICY = "seed"                       # "seed": any term; "absent_from_reply": only terms the reply does not restate
# LoRA
LORA_R = 64                                # rank
LORA_ALPHA = 16                            # scale = alpha / r
LORA_DROPOUT = 0.2                         # v1 used 0.05
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULES_TO_SAVE = ["embed_tokens", "lm_head"]  # as the original; Qwen3 ties them, so the one shared matrix is trained
EMBEDDING_MODE = "tokens"                  # "tokens": the rows of the training inputs' tokens; "full": all 151,936
EMBEDDING_LEARNING_RATE = 5e-5             # "full" only: the embedding's own rate, 4x below LEARNING_RATE (2-10x usual)
# optimisation
EPOCHS = 3.0                               # passes over train.jsonl (ignored when MAX_STEPS > 0)
MAX_STEPS = -1                             # > 0 stops after this many optimizer steps
BATCH_SIZE = 4                             # examples per micro-batch
GRADIENT_ACCUMULATION = 4                  # micro-batches per optimizer step: 4 x 4 = 16 examples
LEARNING_RATE = 2e-4                       # peak learning rate
LR_SCHEDULER = "cosine"                    # decay after warmup: linear, cosine, constant, ...
WARMUP_RATIO = 0.1                         # fraction of the steps spent warming up
WEIGHT_DECAY = 0.0                         # AdamW weight decay
OPTIM = "paged_adamw_8bit"                 # bitsandbytes paged 8-bit AdamW (on CPU it runs unpaged)
MAX_GRAD_NORM = 0.3                        # gradient clipping
SEED = 42                                  # data order, dropout and LoRA init
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
OUTPUT_DIR = "output/qwen3-1.7b-qlora-v3"  # final/ (best adapter), summary.json, metrics.jsonl, loss.png
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
    cfg.print(f"QLoRA {cfg.VERSION} settings")
    check_settings(check_training_settings(cfg) + check_masking_settings(cfg))

    # ========== 2. Tokenizer and data ==========
    model_path = resolve_model_path(cfg.MODEL_PATH, tokenizer_only=cfg.DRY_RUN)
    tokenizer = load_tokenizer(model_path)
    data = load_training_data(cfg, tokenizer)
    # v3: the questions' medical terms are masked afresh each time an example is drawn
    data.train_set = MaskedQuestionDataset(data.train_rows, tokenizer, cfg, data.train_examples)
    show_data_preview(tokenizer, data, cfg)
    print_restated_terms(data.train_set)  # masked terms that the reply restates teach naming what was never said
    if cfg.DRY_RUN:
        return {"data": data, "estimate": print_memory_estimate(model_path, cfg, data)}
    resume = plan_output_dir(cfg, len(data.train_set))

    # ========== 3. 4-bit NF4 base model + LoRA ==========
    warn_if_cpu(cfg.LOAD_IN_4BIT)
    args = training_arguments(cfg)  # first: under DeepSpeed ZeRO-3 the model then loads partitioned
    model = load_lora_model(model_path, cfg, data)

    # ========== 4. Trainer ==========
    trainer = build_trainer(cfg, model, tokenizer, data, args)

    # ========== 5. Train (resumes from the newest checkpoint after a crash) ==========
    wall_time = train(trainer, resume, cfg)

    # ========== 6. Save the best adapter, summary.json and loss.png ==========
    summary = save_results(cfg, trainer, tokenizer, wall_time)

    # ========== 7. One sample answer to a val question ==========
    print_sample_answer(model, tokenizer, data.val_rows[0], cfg)
    return {"data": data, "trainer": trainer, "summary": summary}


if __name__ == "__main__":
    main()

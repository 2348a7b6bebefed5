"""GRPO: R1-style reinforcement learning after SFT, on exam questions with a checkable answer (TRL's GRPOTrainer).

    python train_lora3.py && python train_grpo.py --exam_file=exams/cmb_train.jsonl --benchmark_file=exams/cmb_test.jsonl
    python train_grpo.py --dry_run=True                          # one prompt, a written completion's rewards, will it fit?
    python train_grpo.py --sft_adapter=output/qwen3-1.7b-qlora-v2/final   # continue another SFT adapter
    python train_grpo.py --sft_adapter= --model_path=Qwen/Qwen3-1.7B      # a fresh LoRA on the base (R1-Zero style)
    python train_grpo.py --max_steps=400                         # after a crash, the same command resumes
    python benchmark.py --finetuned_path=output/qwen3-1.7b-grpo/final --exam_file=exams/cmb_test.jsonl --mode=generate
"""
from medsft import chat_format
from medsft.distributed import quiet_other_ranks
from medsft.grpo import (build_grpo_trainer, check_grpo_settings, grpo_data_fingerprint, load_policy_model,
                         print_dry_run_reward, save_grpo_results, take_sft_run_settings)
from medsft.grpo_data import check_exam_prompts, load_exam_prompts, show_exam_prompts
from medsft.memory_estimate_grpo import print_grpo_memory_estimate
from medsft.model_loading import load_tokenizer, resolve_model_path, warn_if_cpu
from medsft.resume import finished_run, plan_output_dir
from medsft.rewards import reward_functions
from medsft.settings import check_settings, parse_settings
from medsft.training import print_sample_answer, train

# -----------------------------------------------------------------------------
# version
VERSION = "grpo"                           # written to summary.json for compare.py
KEY_CHANGE = "SFT v3 + GRPO on exam questions with verifiable rewards"
# model
SFT_ADAPTER = "output/qwen3-1.7b-qlora-v3/final"  # the SFT adapter GRPO continues; "" = a fresh LoRA on MODEL_PATH;
                                           # a merged or full model folder = a fresh LoRA on that model
MODEL_PATH = "Qwen/Qwen3-1.7B"             # the base; by default the one SFT_ADAPTER was trained on (its settings.json)
LOAD_IN_4BIT = True                        # QLoRA: NF4 base with double quantisation, bf16 compute; False = bf16 LoRA
ATTN_IMPLEMENTATION = "sdpa"               # "flash_attention_2" if installed
# data
EXAM_FILE = ["data/exam_sample.jsonl"]     # exam files to train on (comma-separated): JSONL, CMMLU/C-Eval CSV, ...
BENCHMARK_FILE = []                        # the test files you will report on: their questions are never trained on
VAL_QUESTIONS = 64                         # held out for the greedy accuracy that picks best/ (at most a fifth)
SYSTEM_PROMPT = chat_format.SYSTEM_PROMPT   # by default the SFT run's; inference_lora.py uses the same
# LoRA (a fresh one only: a continued SFT adapter keeps its own)
LORA_R = 64                                # rank
LORA_ALPHA = 16                            # scale = alpha / r
LORA_DROPOUT = 0.0                         # dropout would make the sampling policy differ from the trained one
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULES_TO_SAVE = []                       # no embedding rows: GRPO does not need new tokens
# rewards (medsft/rewards.py; their weights are constants there)
THINK_BUDGET = 768                         # think tokens without penalty; then a linear penalty down to 0 at the limit
# GRPO
NUM_GENERATIONS = 8                        # answers sampled per question (TRL's default, DeepSeekMath used 64, DAPO 16)
MAX_COMPLETION_LENGTH = 1024               # tokens per answer; the dataset's thinks: p99 about 1,000 characters
TEMPERATURE = 1.0                          # sample the policy itself (DAPO, R1): the loss's log-probs are at the same
TOP_P = 1.0                                # temperature, and Qwen3's 0.6/0.95/20 would explore less;
TOP_K = 0                                  # 0 = no top-k (Qwen3's chat setting is 20)
BETA = 0.0                                 # KL to the start: 0 holds no reference model (DAPO, Dr. GRPO; TRL's default)
LOSS_TYPE = "dapo"                         # TRL's default: token-level, no length bias (DAPO)
MASK_TRUNCATED_COMPLETIONS = True          # answers cut off at max_completion_length teach nothing (DAPO)
USE_VLLM = False                           # CUDA + `pip install vllm`: colocated generation, sleep mode (unverified)
VLLM_GPU_MEMORY_UTILIZATION = 0.3          # the share of the GPU vLLM may take in colocate mode
# optimisation
EPOCHS = 1.0                               # passes over the training questions (ignored when MAX_STEPS > 0)
MAX_STEPS = -1                             # > 0 stops after this many optimizer steps
BATCH_SIZE = 2                             # completions per micro-batch
GRADIENT_ACCUMULATION = 8                  # micro-batches per step: 2 x 8 = 16 completions = 2 questions x 8
LEARNING_RATE = 2e-5                       # 10x below SFT's 2e-4: RL updates follow a noisy reward
LR_SCHEDULER = "constant_with_warmup"      # RL: no decay to zero while the reward still moves
WARMUP_RATIO = 0.05                        # fraction of the steps spent warming up
WEIGHT_DECAY = 0.0                         # AdamW weight decay
OPTIM = "paged_adamw_8bit"                 # bitsandbytes paged 8-bit AdamW (on CPU it runs unpaged)
MAX_GRAD_NORM = 0.2                        # gradient clipping (TRL's GRPO examples use 0.1-1.0)
SEED = 42                                  # data order, sampling and LoRA init
# speed and memory
USE_LIGER_KERNEL = True                    # CUDA + `pip install liger-kernel`: its fused layer kernels
GRADIENT_CHECKPOINTING = True              # recompute activations in backward: much less memory, slower
GPU_MEMORY_GB = 0.0                        # the dry run's budget: 0 = the visible GPU's memory, or 16 without one
# evaluation and checkpoints
EVAL_STEPS = 25                            # greedy held-out accuracy every this many steps (and at the end)
EVAL_BATCH_SIZE = 16                       # held-out questions answered at once
SAVE_STEPS = 25                            # checkpoint-N every this many steps, for resuming
SAVE_TOTAL_LIMIT = 2                       # checkpoints kept
LOG_STEPS = 1                              # one progress line (each reward's mean) every this many steps
# output
OUTPUT_DIR = "output/qwen3-1.7b-grpo"      # final/ (best adapter), summary.json, metrics.jsonl, reward.png
RESUME = "auto"                            # "auto": continue from the newest checkpoint; "never"; or a checkpoint folder
OVERWRITE = False                          # True replaces a finished run in OUTPUT_DIR
REPORT_TO = "auto"                         # "auto": SwanLab if logged in, else nothing; "swanlab"; "tensorboard"; "none"
PROGRESS_BAR = True                        # the library's progress bar
DRY_RUN = False                            # True: one prompt, a written completion's rewards, the estimate, then stop
SAMPLE_MAX_NEW_TOKENS = 1024               # tokens of the sample answer printed at the end
# -----------------------------------------------------------------------------


def main(argv=None, reward_funcs=None):
    # ========== 1. Settings: every problem reported before the model loads ==========
    quiet_other_ranks()  # several processes (torchrun, accelerate launch): only the main one prints
    cfg = parse_settings(globals(), argv)
    cfg._data_fingerprint = grpo_data_fingerprint  # GRPO: a resume must see the same exam and benchmark files
    take_sft_run_settings(cfg)  # RL: the base and prompt of the SFT run, and the chain base -> SFT -> GRPO
    if finished_run(cfg):  # the same command again: say where the result is, before any long printout
        return None
    cfg.print("GRPO settings")
    check_settings(check_grpo_settings(cfg))

    # ========== 2. Tokenizer and exam prompts (RL: questions with a checkable answer, no replies) ==========
    model_path = resolve_model_path(cfg.MODEL_PATH, tokenizer_only=cfg.DRY_RUN)
    tokenizer = load_tokenizer(model_path)
    prompts = load_exam_prompts(cfg, tokenizer)
    check_exam_prompts(prompts, cfg)
    show_exam_prompts(prompts, cfg)
    functions, weights = reward_functions(cfg.THINK_BUDGET, cfg.MAX_COMPLETION_LENGTH)
    if cfg.DRY_RUN:
        longest = max(len(ids) for ids in prompts.prompt_ids.values())
        return {"data": prompts, "rewards": print_dry_run_reward(prompts, cfg),
                "estimate": print_grpo_memory_estimate(model_path, cfg, longest)}
    resume = plan_output_dir(cfg, len(prompts.train_rows) * cfg.NUM_GENERATIONS)

    # ========== 3. 4-bit NF4 base model + the SFT adapter, trainable ==========
    warn_if_cpu(cfg.LOAD_IN_4BIT)
    model = load_policy_model(model_path, cfg)

    # ========== 4. Trainer (TRL's GRPOTrainer: sampling, advantages, loss) ==========
    if reward_funcs is not None:  # a test's own rewards (tests/test_grpo.py's learnable toy)
        functions, weights = reward_funcs, [1.0] * len(reward_funcs)
    trainer = build_grpo_trainer(cfg, model, tokenizer, prompts, functions, weights)

    # ========== 5. Train (resumes from the newest checkpoint after a crash) ==========
    wall_time = train(trainer, resume, cfg)

    # ========== 6. Save the best adapter, summary.json and reward.png ==========
    summary = save_grpo_results(cfg, trainer, tokenizer, wall_time, prompts)

    # ========== 7. One sample answer to a held-out question ==========
    print_sample_answer(model, tokenizer, {"question": prompts.val_rows[0]["question"]}, cfg)
    return {"data": prompts, "trainer": trainer, "summary": summary}


if __name__ == "__main__":
    main()

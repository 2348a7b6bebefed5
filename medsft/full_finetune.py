"""What train.py (full fine-tuning) adds to the shared pipeline: the bf16 model, a bf16-safe optimizer, full-model best/.

Memory plan for Qwen3-1.7B (1.72e9 weights, derived, not measured): bf16 weights 3.4 GB + bf16 gradients 3.4 GB +
8-bit AdamW states 3.4 GB = 10.3 GB, plus activations kept small by checkpointing and the chunked loss.
fp32 master weights would add 6.9 GB, so instead each bf16 weight update is rounded stochastically: up or down
with the probabilities that make its expected value exact. Round-to-nearest loses every update smaller than half
a bf16 step (2^-9 = 0.002 just below 1.0), and lr 5e-6 x a normal Adam update is far smaller.
"""
import functools

from transformers import TrainerCallback

from medsft.errors import UserError

# transformers' names for torchao's low-bit AdamW, which can round bf16 weights stochastically
STOCHASTIC_ROUNDING_OPTIMIZERS = {"adamw_torch_8bit": "AdamW8bit", "adamw_torch_4bit": "AdamW4bit"}


# ---------------------------------------------------------------------------------------------------------
# 1. settings


def check_full_finetune_settings(cfg) -> list[str]:
    import importlib.util

    from medsft.distributed import sharding

    problems, zero = [], sharding() == "deepspeed"  # ZeRO keeps fp32 master weights: nothing is rounded away
    if cfg.LOAD_IN_4BIT:
        problems.append("load_in_4bit must be False: full fine-tuning trains every weight, and 4-bit weights cannot "
                        "be trained (use train_lora.py for QLoRA)")
    if not cfg.FP32_WEIGHTS and cfg.OPTIM not in STOCHASTIC_ROUNDING_OPTIMIZERS and not zero:
        problems.append(f"optim {cfg.OPTIM!r} rounds bf16 weights to nearest, which loses lr {cfg.LEARNING_RATE:g} "
                        f"updates; use {' or '.join(STOCHASTIC_ROUNDING_OPTIMIZERS)} (stochastic rounding), "
                        "or --fp32_weights=True")
    if not cfg.FP32_WEIGHTS and not cfg.BF16_STOCHASTIC_ROUND and not zero:
        problems.append("bf16_stochastic_round=False with bf16 weights: updates below bf16's resolution would be "
                        "rounded away; keep it True, or pass --fp32_weights=True")
    if cfg.OPTIM in STOCHASTIC_ROUNDING_OPTIMIZERS and importlib.util.find_spec("torchao") is None and not zero:
        problems.append(f"optim {cfg.OPTIM!r} needs torchao: pip install 'torchao>=0.11'")
    problems += sharding_problems(cfg)
    return problems


def sharding_problems(cfg) -> list[str]:
    """FSDP keeps no fp32 copy of bf16 weights, and its AdamW (DTensors: no torchao) would round lr updates away."""
    from medsft.distributed import sharding

    if sharding() == "fsdp" and not cfg.FP32_WEIGHTS:
        return ["under FSDP pass --fp32_weights=True (FSDP's AdamW rounds bf16 weights to nearest, which loses lr "
                f"{cfg.LEARNING_RATE:g} updates); or use accelerate_configs/deepspeed_zero3.yaml, whose ZeRO "
                "optimizer keeps fp32 master weights"]
    return []


# ---------------------------------------------------------------------------------------------------------
# 3. model


def load_full_model(model_path: str, cfg):
    """Every weight trainable: bf16 (or fp32 with FP32_WEIGHTS), activation checkpointing on request."""
    import torch

    from medsft.distributed import sharding
    from medsft.model_export import THINKING_SAMPLING
    from medsft.model_loading import compute_dtype, load_base_model

    if not cfg.FP32_WEIGHTS and compute_dtype() != torch.bfloat16:
        raise UserError("error: this GPU has no native bf16 (e.g. T4, V100), so the weights cannot be trained in "
                        "bf16; pass --fp32_weights=True (fp32 weights, fp16 compute: about twice the memory)")
    # loaded in fp32 rather than cast after: ZeRO-3 partitions the weights as they load
    model = load_base_model(model_path, False, cfg.ATTN_IMPLEMENTATION, torch.float32 if cfg.FP32_WEIGHTS else None)
    if cfg.GRADIENT_CHECKPOINTING:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # written with every best/ and final/, so serving frameworks sample as Qwen3 advises for thinking mode
    for key, value in THINKING_SAMPLING.items():
        setattr(model.generation_config, key, value)
    model.trainable_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    where = f", partitioned by {sharding()}" if sharding() else ""
    print(f"trainable parameters: {model.trainable_params:,} (all of them, in {dtype}{where})", flush=True)
    return model


# ---------------------------------------------------------------------------------------------------------
# 4. trainer


def use_full_model_training(trainer, cfg) -> None:
    """Hooks on the shared trainer: the bf16-safe optimizer, and a check that DDP replicas stay equal.

    The optimizer is given as a class and its arguments, so the Trainer still builds it after wrapping the model
    (DDP), with its usual weight-decay groups, and saves and resumes its state in checkpoints. Under DeepSpeed
    ZeRO's optimizer replaces it: it keeps fp32 master weights of each process's shard (nothing to round), with
    torch's AdamW states (12 bytes per weight over the GPUs, instead of 8-bit AdamW's 2 on each).
    """
    if trainer.sharded:
        return
    if cfg.OPTIM in STOCHASTIC_ROUNDING_OPTIMIZERS:
        args = trainer.args
        trainer.optimizer_cls_and_kwargs = (low_bit_adamw(cfg.OPTIM), {
            "lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
            "bf16_stochastic_round": cfg.BF16_STOCHASTIC_ROUND})
    trainer.add_callback(ReplicaCheck())


@functools.cache
def low_bit_adamw(optim: str):
    """torchao's AdamW8bit / AdamW4bit; on CPU its step runs eagerly (compiling it takes ~30 s per weight shape)."""
    import torch
    import torchao.optim

    base = getattr(torchao.optim, STOCHASTIC_ROUNDING_OPTIMIZERS[optim])

    class LowBitAdamW(base):
        @torch.no_grad()
        def step(self, closure=None):
            on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
            if not on_cpu:
                return super().step(closure)
            with torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    LowBitAdamW.__name__ = LowBitAdamW.__qualname__ = base.__name__
    return LowBitAdamW


class ReplicaCheck(TrainerCallback):
    """At every evaluation under DDP: do all ranks hold the same weights? (see sync_replicas)"""

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        sync_replicas(model)


def sync_replicas(model) -> bool:
    """True when every rank holds the same weights; otherwise rank 0's are copied to all, with a warning.

    DDP averages the gradients but each rank updates its own weights, and stochastic rounding draws random
    numbers there. The trainer seeds every rank alike, so they should agree; this checks it, cheaply.
    """
    import torch
    import torch.distributed as dist

    if model is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    params = list(model.parameters())
    sums = torch.stack([p.detach().float().sum() for p in params] + [p.detach().float().square().sum() for p in params])
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if torch.equal(high, low):
        return True
    if dist.get_rank() == 0:
        print("warning: the GPUs' copies of the weights drifted apart (stochastic rounding drew different random "
              "numbers); copying rank 0's weights to all", flush=True)
    for p in params:
        dist.broadcast(p.data, src=0)
    return False

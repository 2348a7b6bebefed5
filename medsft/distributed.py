"""Multi-process training: which launcher started us, what it can run, and one voice on the console.

`torchrun --nproc_per_node N` and `accelerate launch` both set RANK, LOCAL_RANK and WORLD_SIZE; `accelerate
launch` with an FSDP or DeepSpeed config also sets ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED, which the
Trainer reads. Without those, N processes train data-parallel (DDP): each holds its own copy of the model.
"""
import importlib.util
import os
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def sharding() -> str | None:
    """"fsdp" or "deepspeed" when accelerate launch was given such a config, else None (DDP or one process)."""
    for name in ("fsdp", "deepspeed"):
        if os.environ.get(f"ACCELERATE_USE_{name.upper()}", "false").lower() in ("1", "true", "yes"):
            return name
    return None


def quiet_other_ranks() -> None:
    """Only the main process prints; the others keep stderr, so their errors still show."""
    if not is_main_process():
        sys.stdout = open(os.devnull, "w")


def launch_problems() -> list[str]:
    """Launcher and settings combinations that cannot work, found before the model loads."""
    import torch

    problems, n, sharded = [], world_size(), sharding()
    cuda = torch.cuda.is_available()
    if sharded == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append("the accelerate config uses DeepSpeed, which is not installed (pip install deepspeed)")
    if sharded == "fsdp" and "FULL_STATE_DICT" not in os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT"):
        problems.append("fsdp_state_dict_type must be FULL_STATE_DICT, so best/ and final/ hold the whole adapter "
                        "(as in accelerate_configs/fsdp_qlora.yaml)")
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", n))
    if cuda and per_machine > torch.cuda.device_count():
        problems.append(f"{per_machine} processes on this machine but only {torch.cuda.device_count()} GPUs; "
                        "start one process per GPU (--nproc_per_node / num_processes)")
    return problems


def optimizer_for_launcher(optim: str, full_model: bool = False) -> str:
    """The optimizer the Trainer builds under this launcher (one note when it differs from `optim`).

    FSDP2 hands its sharded weights to the optimizer as DTensors, which bitsandbytes' 8-bit kernels refuse;
    DeepSpeed keeps fp32 master weights of its own shard, so torchao's bf16 stochastic rounding has nothing to do
    there. Both then use torch's AdamW, whose states are sharded over the GPUs like the weights.
    """
    low_bit = "8bit" in optim or "4bit" in optim
    if (sharding() == "fsdp" and low_bit) or (sharding() == "deepspeed" and full_model and low_bit):
        print(f"note: under {sharding()} the optimizer is adamw_torch instead of {optim} "
              f"({'sharded fp32 states' if sharding() == 'fsdp' else 'fp32 master weights in ZeRO'})", flush=True)
        return "adamw_torch"
    return optim


def check_zero3_partitioned(model) -> None:
    """Under ZeRO-3 every weight must come out of from_pretrained already partitioned over the processes (each
    holds 1/N): that needs the Trainer's arguments, which register the DeepSpeed config, built before loading."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from medsft.errors import UserError

    if sharding() != "deepspeed" or not is_deepspeed_zero3_enabled():
        return
    whole = [name for name, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if whole:
        raise UserError(f"error: ZeRO-3 did not partition {len(whole)} weights at load time (e.g. {whole[0]}); build "
                        "the TrainingArguments before loading the model, and pass no device_map")


def check_sharding_is_on(trainer) -> None:
    """The launcher asked for FSDP or DeepSpeed and several processes: the Trainer must really use them.

    Otherwise each rank would train its own copy into the same folder (accelerate silently falls back when a
    setup does not support the sharding it was asked for).
    """
    from medsft.errors import UserError

    asked, on = sharding(), {"fsdp": trainer.is_fsdp_enabled, "deepspeed": trainer.is_deepspeed_enabled}
    if asked and not on[asked]:
        raise UserError(f"error: the accelerate config asks for {asked}, but the Trainer runs without it on this "
                        "setup (accelerate turns it on for GPU processes only); launch on GPUs, or use "
                        "accelerate_configs/multi_gpu.yaml")
    if world_size() > 1 and trainer.args.world_size != world_size():
        raise UserError(f"error: {world_size()} processes were launched but the Trainer sees "
                        f"{trainer.args.world_size}; each would train alone into the same folder")


def use_liger_kernel(wanted: bool) -> bool:
    """Liger's fused kernels on CUDA when installed; otherwise a note and the plain forward."""
    if not wanted:
        return False
    import torch

    if not torch.cuda.is_available():
        print("note: use_liger_kernel applies on CUDA only; on CPU the loss uses the plain forward")
        return False
    if importlib.util.find_spec("liger_kernel") is None:
        print("note: liger-kernel is not installed, so the training loss materialises the full-vocabulary "
              "logits; `pip install liger-kernel` for its fused cross-entropy (much less memory)")
        return False
    return True

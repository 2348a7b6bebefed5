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
    if sharded and not cuda:
        problems.append(f"{sharded} needs CUDA GPUs; on CPU launch plain data parallel instead "
                        "(torchrun --nproc_per_node N, or accelerate_configs/multi_gpu.yaml, which falls back to CPU)")
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

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


def import_deepspeed_only_when_launched() -> None:
    """Keep DeepSpeed unimported unless `accelerate launch` asked for it.

    accelerate's extract_model_from_parallel (save_pretrained, the Trainer) imports deepspeed whenever it is
    installed, only to ask whether the model is a DeepSpeedEngine; that import takes seconds and prints
    "[WARNING] ... Setting accelerator to CPU" on a machine without a GPU. A model can only be a DeepSpeedEngine
    once deepspeed is imported, so the question is asked only then. Called before a model loads or is built.
    """
    if sharding() == "deepspeed":
        return
    from accelerate.utils import other

    installed = other.is_deepspeed_available
    if getattr(installed, "only_when_imported", False):
        return

    def deepspeed_in_use() -> bool:
        return "deepspeed" in sys.modules and installed()

    deepspeed_in_use.only_when_imported = True
    other.is_deepspeed_available = deepspeed_in_use


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


def shard_tied_token_rows(trainer) -> None:
    """FSDP2 with EMBEDDING_MODE="tokens" on a tied QLoRA model: the FSDP2 units, made here as accelerate makes
    them, but with embed_tokens and lm_head in one unit.

    PEFT puts a TrainableTokensWrapper on embed_tokens and a tied one on lm_head; both hold the one embedding
    weight and the one delta of the trained rows. accelerate 1.15 (fsdp2_prepare_model) looks for the tie as
    `get_input_embeddings().weight is get_output_embeddings().weight`, but the wrapper's `.weight` is a merged copy
    made on each read, so it shards embed_tokens alone, then lm_head, whose delta is already sharded: torch fails
    ("Invariant encountered: value was None", DeviceMesh._concatenate). And once a unit holds the wrappers, that
    read itself fails (index_copy of a plain index into a sharded weight). accelerate leaves a model that is
    already an FSDP2 module as it is, so the units are made here before it prepares the model: the plugin's
    transformer layers one by one, then [embed_tokens, lm_head] (not resharded after forward, as accelerate's own
    unit for a tied embedding), then the root. The embedding stays one sharded copy (1/N per GPU), the delta too.
    Only for 4-bit models: there every rank loads the weights (accelerate's rank-0-only loading is for bf16). An
    untied model's two wrappers share nothing, and accelerate's own units take them (tried on an untied tiny Qwen3:
    it trains and resumes)."""
    if not trainer.is_fsdp_enabled:  # every other launch: nothing to look for
        return
    from peft.utils.other import TrainableTokensWrapper

    model = trainer.model
    wrappers = [m for m in model.modules() if isinstance(m, TrainableTokensWrapper)]
    if not any(w.token_adapter.tied_adapter is not None for w in wrappers):
        return
    from accelerate.utils import get_module_children_bottom_up
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    accelerator, plugin = trainer.accelerator, trainer.accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    unit = {"offload_policy": plugin.cpu_offload, "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
            "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None}
    plugin.set_auto_wrap_policy(model)
    if plugin.activation_checkpointing:
        # accelerate applies FSDP's activation checkpointing only to a model it has not seen sharded (accelerator.py,
        # _prepare_fsdp2: `not isinstance(model, FSDPModule)`): the model sharded here would train without any.
        # So the same layers are checkpointed here, before sharding, with transformers' own checkpointing (torch's
        # non-reentrant checkpoint). Not accelerate's fsdp2_apply_ac: its CheckpointWrapper puts
        # `_checkpoint_wrapped_module` into every layer's parameter names, and the adapter saved from the gathered
        # state lacked all 28 LoRA tensors of the tiny model's layers (tried; check_saved_weights stopped the run)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    is_layer = fsdp2_prepare_auto_wrap_policy(plugin, model) or (lambda module: False)
    for module in get_module_children_bottom_up(model)[:-1]:
        if is_layer(module):
            fully_shard(module, reshard_after_forward=plugin.reshard_after_forward, **unit)
    fully_shard(wrappers, reshard_after_forward=False, **unit)
    fully_shard(model, **unit)
    for wrapper in wrappers:
        if wrapper.token_adapter.tied_adapter is not None:
            wrapper.register_state_dict_post_hook(_without_tied_copy)


def fsdp_activation_checkpointing() -> bool:
    """The accelerate config's fsdp_activation_checkpointing (FSDP's own, applied when the model is prepared)."""
    return sharding() == "fsdp" and \
        os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in ("1", "true", "yes")


def _without_tied_copy(module, state_dict, prefix, local_metadata) -> None:
    """The tied lm_head wrapper's entries are embed_tokens' weight and delta under a second name. Left in, every
    checkpoint holds the whole frozen embedding once more (622 MB at 1.7B in bf16), and resuming fails: torch's
    set_model_state_dict (broadcast from rank 0) lists a shared module's tensors under its first name only and
    stops on the second (KeyError '...lm_head.token_adapter.trainable_tokens_delta.default'). PEFT saves the
    adapter without them anyway (a tied TrainableTokensWrapper leaves its state to the one it is tied to)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]

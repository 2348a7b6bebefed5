"""Finding, downloading and loading the base Qwen3 and its tokenizer."""
import functools
import os
from pathlib import Path

from medsft.chat_format import build_messages, format_reply, render_training_text
from medsft.distributed import check_zero3_partitioned, import_deepspeed_only_when_launched, local_rank, sharding
from medsft.errors import UserError
from medsft.hub_download import download_model


TOKENIZER_FILES = ["*.json", "*.txt", "*.jinja"]  # config, tokenizer and chat template: no weights
MODEL_FILES = [*TOKENIZER_FILES, "*.safetensors"]  # and the weights: no README, LICENSE or other formats


def resolve_model_path(model_path: str, tokenizer_only: bool = False) -> str:
    """A local folder as is; otherwise the files training needs, from ModelScope, then the Hugging Face Hub.

    tokenizer_only fetches just the small files (a dry run needs no weights); a later full call adds the rest.
    """
    patterns = TOKENIZER_FILES if tokenizer_only else MODEL_FILES
    if Path(model_path).is_dir():
        return check_model_folder(model_path, tokenizer_only)
    if Path(model_path).exists() or model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise UserError(f"error: model path {model_path!r}: no such folder (a model id looks like Qwen/Qwen3-1.7B)")
    return download_model(model_path, patterns)


def check_model_folder(folder: str, tokenizer_only: bool = False) -> str:
    """The folder, if it holds a model's config, tokenizer and (unless tokenizer_only) weights; else one clear error."""
    path = Path(folder)
    have = {p.name for p in path.iterdir()}
    missing = [] if "config.json" in have else ["config.json"]
    if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
        missing.append("a tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if "tokenizer_config.json" not in have:
        missing.append("tokenizer_config.json")
    if not tokenizer_only and not any(name.endswith((".safetensors", ".bin")) for name in have):
        missing.append("weights (*.safetensors or *.bin)")
    if missing:
        what = "is empty" if not have else "lacks " + ", ".join(missing)
        raise UserError(f"error: model folder {folder} {what}; pass a complete model folder (as downloaded) "
                        "with --model_path")
    return folder


def run_folder_hint(path) -> str:
    """"; did you mean RUN/final?" when `path` is a training run's folder (its adapter or model is in final/), else "".

    The end of a "not an adapter / not a model" error, the same in every script that takes a trained model.
    """
    final = Path(path) / "final"
    if (final / "adapter_config.json").is_file() or (final / "config.json").is_file():
        return f"; did you mean {final}?"
    return ""


def adapter_path_hint(path, merging: bool = False) -> str:
    """The end of a "not a LoRA adapter" error: the run folder's final/, or, for a base, merged or full model
    folder, how to use it alone (`--model_path=X --adapter_path=`); "" when neither fits."""
    hint = run_folder_hint(path)
    if hint or not (Path(path) / "config.json").is_file():
        return hint
    if merging:
        return f"; {path} is a whole model folder (base, merged or full), which has nothing to merge"
    return f"; {path} is a whole model folder (base, merged or full): pass --model_path={path} --adapter_path="


def report_folder(trained_path, data_dir) -> Path:
    """Where a script's report goes by default: the training run's folder (beside final/) when `trained_path` is
    a run's final/ or best/ (its parent holds the run's settings.json), else `data_dir`; never the working folder."""
    trained = Path(trained_path) if trained_path else None
    if trained is not None and trained.is_dir() and (trained.parent / "settings.json").is_file():
        return trained.parent
    return Path(data_dir)


def load_tokenizer(model_path: str):
    """The model's tokenizer, checked to render our chat format as Qwen3 does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.chat_template:  # a base model's folder: transformers would stop with a ValueError later
        raise UserError(f"error: the tokenizer in {model_path} has no chat template; pass a folder whose tokenizer "
                        "has Qwen3's chat template (e.g. Qwen/Qwen3-1.7B)")
    prompt, reply = render_training_text(tokenizer, "问", "想", "答")
    expected = tokenizer.apply_chat_template(build_messages("问", reply=format_reply("想", "答")), tokenize=False)
    if prompt + reply != expected or "<think>" not in tokenizer.get_vocab():
        raise UserError(f"error: the tokenizer in {model_path} does not use Qwen3's chat template with <think> "
                        "blocks; use a Qwen3 model (Qwen/Qwen3-0.6B, Qwen/Qwen3-1.7B, ...)")
    tokenizer.padding_side = "right"
    return tokenizer


@functools.cache
def compute_dtype():
    """bf16, except fp16 on GPUs without native bf16 (T4, V100), where bf16 is emulated and slow."""
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def load_base_model(model_path: str, load_in_4bit: bool, attn_implementation: str = "sdpa", dtype=None):
    """Qwen3 in bf16, or in 4-bit NF4 with double quantisation and bf16 compute (QLoRA); fp16 on old GPUs.

    Under ZeRO-3 (TrainingArguments built first) each process loads only its partition of the weights; a 4-bit
    base loads whole and is partitioned when DeepSpeed wraps it (transformers skips zero.Init for quantized models).
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import_deepspeed_only_when_launched()
    kwargs = {"dtype": dtype or compute_dtype(), "attn_implementation": attn_implementation}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(),
            # FSDP and ZeRO-3 shard each layer's weights as tensors of one dtype: store the 4-bit bytes in it too
            **({"bnb_4bit_quant_storage": compute_dtype()} if sharding() else {}),
        )
    if torch.cuda.is_available() and not sharding():  # FSDP and DeepSpeed place (and shard) the weights themselves
        kwargs["device_map"] = {"": local_rank()}  # each process its own GPU, with its own copy
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if not load_in_4bit:
        check_zero3_partitioned(model)
    return model


def warn_if_cpu(load_in_4bit: bool) -> None:
    import torch

    if not torch.cuda.is_available() and not os.environ.get("MEDSFT_QUIET_CPU"):
        how = "bitsandbytes NF4 works there, but slowly" if load_in_4bit else "in float32, slowly"
        print(f"warning: no CUDA GPU found; running on CPU ({how}). "
              "This is fine for the tiny test model, not for Qwen3-1.7B.", flush=True)

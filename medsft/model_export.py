"""From a LoRA adapter to one plain model folder any serving engine loads: merge, write, check.

    from medsft.model_export import write_model_folder
    write_model_folder("output/my-model", model, tokenizer, settings=cfg.as_dict())   # any finished model

merge_lora.py uses the steps one by one: load the base in bf16 with the adapter (merged in float32 so the only
rounding is the final one to bf16), merge, write into a temporary folder, reload that folder with plain
transformers and compare its logits with base+adapter, and only then rename it into place.
"""
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from medsft.chat_format import SYSTEM_PROMPT, render_training_text
from medsft.errors import UserError
from medsft.records import make_shareable, read_jsonl

# Qwen3's thinking-mode sampling, written to generation_config.json so vLLM, SGLang and transformers use it
THINKING_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}

MERGE_TARGETS = ("bf16", "dequantized_nf4")  # the bases merge_lora.py merges into

# A correct merge differs from base+adapter only by writing the merged weights in bf16: 8 significant bits,
# so each weight moves by at most 2^-9 (0.2%) of itself. Those errors are independent and mostly cancel in
# each layer's sums; on the tiny test model they move the logits by 0.16-0.21% of the largest one. 2% leaves room
# for a deeper model, while a broken merge (the adapter lost, the embedding untied or tied to the base's
# copy) moves the logits by the adapter's whole effect, which merge.json records beside the difference.
RELATIVE_TOLERANCE = 0.02

# used when DATA_DIR has no val.jsonl: (question, think, answer), rendered as training renders them
BUILT_IN_CHECK_ROWS = [
    ("我最近总是头晕，还伴有耳鸣，这可能是什么原因？", "头晕伴耳鸣，要考虑内耳、血压和颈椎的问题。",
     "可能的原因包括梅尼埃病、高血压和颈椎病，建议到医院做血压和听力检查。"),
    ("糖尿病人可以吃水果吗？", "糖尿病人吃水果要看血糖控制情况和水果的含糖量。",
     "血糖控制平稳时可以在两餐之间少量吃低糖水果，如苹果、柚子，并监测血糖。"),
    ("胸痛持续了3天，需要立即就医吗？", "持续胸痛可能是心脏问题，需要排除急性冠脉综合征。",
     "需要。持续胸痛应尽快到医院就诊；如疼痛剧烈或伴有出汗、气短，请立即拨打120。"),
]


# ---------------------------------------------------------------------------------------------------------
# settings


def recorded_base(adapter_path) -> str | None:
    """The base an adapter was trained on: its settings.json MODEL_PATH, else adapter_config.json's."""
    for name, key in (("settings.json", "MODEL_PATH"), ("adapter_config.json", "base_model_name_or_path")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            value = json.loads((Path(adapter_path) / name).read_text(encoding="utf-8")).get(key)
            if value:
                return value
    return None


def adapter_problems(adapter_path) -> list[str]:
    """Why `adapter_path` is not a LoRA adapter folder (OUTPUT_DIR/final of a run); [] when it is."""
    path = Path(adapter_path)
    if not str(adapter_path):
        return ["adapter_path is empty: name the adapter to merge (OUTPUT_DIR/final of a training run)"]
    if not path.exists():
        return [f"adapter_path {path} not found; name the adapter to merge (OUTPUT_DIR/final of a training run)"]
    if not (path / "adapter_config.json").is_file():
        from medsft.assistant import final_folder_hint

        hint = final_folder_hint(path, holds=("adapter_config.json",))
        return [f"adapter_path {path} has no adapter_config.json, so it is not a LoRA adapter{hint}"]
    return []


def quantisation_of(model_path) -> str | None:
    """The quantisation method of a saved model folder (bitsandbytes, gptq, awq, ...), or None."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
        quantisation = config.get("quantization_config")
        if quantisation:
            return str(quantisation.get("quant_method", "quantised"))
    return None


def output_problems(output_dir, overwrite: bool) -> list[str]:
    """Why OUTPUT_DIR cannot receive a model folder (exists, or its folder is not writable); [] if it can."""
    out = Path(output_dir)
    if not str(output_dir):
        return ["output_dir is empty"]
    if out.exists() and not overwrite:
        return [f"output_dir {out} already exists; pass --overwrite=True to replace it, or another --output_dir"]
    if out.exists() and not out.is_dir():
        return [f"output_dir {out} is a file, not a folder"]
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        return [f"output_dir {out} cannot be written ({parent} is not a writable folder)"]
    return []


# ---------------------------------------------------------------------------------------------------------
# loading and merging


def pick_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def load_base_and_adapter(model_path: str, adapter_path, device: str, merge_into: str = "bf16"):
    """(base+adapter as a float32 PeftModel, the embedding the merged model must have, as bf16 on the CPU).

    The base loads in bf16 (never 4-bit, even for a QLoRA adapter: merging into a quantised base would round
    the merged weights to 4 bits) and is widened to float32, exactly. With merge_into="dequantized_nf4" it loads
    as training loaded it, NF4 with double quantisation, and each 4-bit layer is dequantized to the very weights
    the adapter was trained against.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from medsft.assistant import attach_adapter
    from medsft.model_loading import load_base_model

    if merge_into == "dequantized_nf4":
        base = load_base_model(model_path, load_in_4bit=True)
        base.dequantize()  # every Linear4bit becomes an nn.Linear; the config loses its quantization_config
    else:
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    base.to(device=device, dtype=torch.float32)
    embedding = trained_embedding(adapter_path, base.get_input_embeddings().weight.detach())
    model = attach_adapter(base, adapter_path, model_path).eval()
    model.to(device=device, dtype=torch.float32)  # the adapter's own weights too
    return model, embedding


def trained_embedding(adapter_path, base_embedding):
    """The embedding the merged model must have, as bf16 on the CPU: the one an adapter trained in full
    (EMBEDDING_MODE="full"), the base's with the trained rows replaced ("tokens"), or the base's."""
    import torch
    from safetensors import safe_open

    embedding = base_embedding.to("cpu", torch.bfloat16, copy=True)
    path = Path(adapter_path) / "adapter_model.safetensors"
    if not path.is_file():
        return embedding
    with safe_open(str(path), framework="pt") as f:
        full = [k for k in f.keys() if k.endswith("embed_tokens.weight") and "lora_" not in k]
        if full:
            return f.get_tensor(full[0]).to(torch.bfloat16)
        rows = [k for k in f.keys() if k.endswith("embed_tokens.token_adapter.trainable_tokens_delta")]
        if rows:
            indices = json.loads((Path(adapter_path) / "adapter_config.json").read_text())["trainable_token_indices"]
            indices = indices.get("embed_tokens") if isinstance(indices, dict) else indices
            embedding[torch.tensor(indices)] = f.get_tensor(rows[0]).to(torch.bfloat16)
    return embedding


def merge_adapter(peft_model):
    """merge_and_unload(), then the plain model, tied again when its config says so (peft#2777's failure)."""
    import torch

    merged = peft_model.merge_and_unload()
    if getattr(merged.config, "tie_word_embeddings", False):
        output, embedding = merged.get_output_embeddings(), merged.get_input_embeddings()
        if output.weight is not embedding.weight:
            if not torch.equal(output.weight, embedding.weight):
                raise UserError("error: after merging, lm_head and embed_tokens differ although the base ties "
                                "them (the adapter trains them separately); this cannot be written as a tied model")
            output.weight = embedding.weight
    return merged


# ---------------------------------------------------------------------------------------------------------
# the check: logits of base+adapter, of the base alone, and of the written folder


def check_examples(tokenizer, data_dir, system_prompt: str = SYSTEM_PROMPT, count: int = 4,
                   max_tokens: int = 256) -> tuple[list, str]:
    """(token id lists of a few whole training texts, where they came from): val.jsonl's first rows, else built-in."""
    path = Path(data_dir) / "val.jsonl" if data_dir else None
    rows = []
    if path and path.is_file():
        rows = [(r["question"], r["think"], r["answer"]) for _, r in read_jsonl(path)
                if all(isinstance(r.get(k), str) for k in ("question", "think", "answer"))][:count]
    source = str(path) if rows else "built-in prompts"
    rows = rows or BUILT_IN_CHECK_ROWS[:count]
    examples = []
    for question, think, answer in rows:
        prompt, reply = render_training_text(tokenizer, question, think, answer, system_prompt)
        examples.append(tokenizer(prompt + reply, add_special_tokens=False)["input_ids"][:max_tokens])
    return examples, source


def logits_of(model, examples) -> list:
    """float32 logits on the CPU, one [tokens, vocab] tensor per example."""
    return list(iter_logits(model, examples))


def iter_logits(model, examples):
    import torch

    device = next(model.parameters()).device
    for ids in examples:
        with torch.no_grad():
            yield model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


def largest_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def check_written_model(folder, reference: list, base_logits: list, examples, embedding, device: str) -> dict:
    """Reload `folder` with plain transformers (no peft) and compare it with base+adapter; raises if it differs."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    gc.collect()  # the merged model, written and dropped by the caller, must not share the GPU with its reload
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    tied_config = bool(getattr(model.config, "tie_word_embeddings", False))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding_matches = torch.equal(model.get_input_embeddings().weight.detach().cpu(), embedding)
    model.to(device=device, dtype=torch.float32)
    difference = largest_difference(iter_logits(model, examples), reference)  # one example's logits at a time
    del model
    scale = max(r.abs().max().item() for r in reference)
    effect = largest_difference(base_logits, reference)
    result = {
        "max_abs_logit_difference": difference, "max_abs_logit": scale,
        "relative_difference": difference / scale, "tolerance": RELATIVE_TOLERANCE,
        "adapter_effect": effect, "adapter_effect_relative": effect / scale,
        "tokens_compared": sum(len(ids) for ids in examples), "examples": len(examples),
        "tied": tied, "embedding_is_the_trained_one": embedding_matches,
    }
    if tied_config and not tied:
        raise UserError("error: the merged model reloaded from disk is not tied (lm_head and embed_tokens are "
                        "two matrices) although its config ties them; nothing was written to the output folder")
    if not embedding_matches:
        raise UserError("error: the merged model's embedding is not the adapter's trained one (or the base's "
                        "when the adapter trains none); nothing was written to the output folder")
    if difference > RELATIVE_TOLERANCE * scale:
        raise UserError(f"error: the merged model's logits differ from base+adapter by {difference:.4g} "
                        f"({100 * difference / scale:.2f}% of the largest logit, tolerance "
                        f"{100 * RELATIVE_TOLERANCE:g}%); the merge failed and nothing was written")
    return result


# ---------------------------------------------------------------------------------------------------------
# writing a plain model folder


def thinking_generation_config(tokenizer, base_config=None):
    """generation_config.json for Qwen3's thinking mode: its sampling, stopping at <|im_end|> or <|endoftext|>."""
    from transformers import GenerationConfig

    from medsft.generation import end_token_ids

    config = GenerationConfig.from_dict(base_config.to_dict()) if base_config is not None else GenerationConfig()
    config.update(**THINKING_SAMPLING, eos_token_id=end_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return config


def save_model_files(folder, model, tokenizer, settings: dict | None = None, max_shard_size: str = "2GB") -> None:
    """Weights as bf16 safetensors shards, config.json, generation_config.json, the tokenizer with its chat
    template (chat_template.jinja) and, if given, settings.json."""
    import torch

    model.to(torch.bfloat16)
    model.generation_config = thinking_generation_config(tokenizer, getattr(model, "generation_config", None))
    model.save_pretrained(str(folder), max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    if settings is not None:
        write_json(Path(folder) / "settings.json", settings)


@contextlib.contextmanager
def staged_folder(output_dir, overwrite: bool = False):
    """A temporary folder beside `output_dir`, renamed to it when the block ends without an error.

    On any error (a failed check included) the temporary folder is removed and `output_dir` is untouched; an
    existing `output_dir` is replaced only with overwrite=True, and only once the new folder is complete.
    """
    out = Path(output_dir)
    problems = output_problems(out, overwrite)
    if problems:
        raise UserError(f"error: {problems[0]}")
    created = [p for p in [out.absolute().parent, *out.absolute().parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    done = False
    try:
        yield temp
        make_shareable(temp)
        _replace_folder(temp, out, overwrite)
        done = True
    except OSError as e:
        raise UserError(f"error: could not write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        for folder in [] if done else created:  # the parent folders made for it, innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _replace_folder(new: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    if not overwrite:  # created by someone else while we worked
        raise UserError(f"error: output_dir {out} appeared while merging; nothing was replaced")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_model_folder(output_dir, model, tokenizer, settings: dict | None = None, extra_files: dict | None = None,
                       overwrite: bool = False, max_shard_size: str = "2GB") -> Path:
    """A plain model folder, written atomically: save_model_files, plus {name: JSON-able} extra files."""
    with staged_folder(output_dir, overwrite) as temp:
        save_model_files(temp, model, tokenizer, settings, max_shard_size)
        for name, content in (extra_files or {}).items():
            write_json(temp / name, content)
    return Path(output_dir)


def write_json(path, content) -> None:
    Path(path).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def library_versions(names=("torch", "transformers", "peft", "safetensors")) -> dict:
    """{package: installed version or None}, for the records a run leaves (merge.json, the bench results)."""
    import importlib.metadata

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions

"""Merge a LoRA adapter into its base: one plain model folder that vLLM, SGLang, llama.cpp and transformers load.

    python merge_lora.py --adapter_path=output/qwen3-1.7b-qlora-v3/final --output_dir=output/qwen3-1.7b-medical-v3
    python merge_lora.py --adapter_path=output/qwen3-1.7b-qlora-v1/final --output_dir=output/qwen3-1.7b-medical-v1
    python merge_lora.py --adapter_path=... --output_dir=... --overwrite=True   # replace an earlier merge
    python merge_lora.py --model_path=/models/Qwen3-1.7B --adapter_path=... --device=cpu   # a local base, no GPU
    python merge_lora.py --adapter_path=... --output_dir=... --merge_into=dequantized_nf4   # the base QLoRA trained on
    python merge_lora.py --adapter_path=output/qwen3-1.7b-qlora-v3/final --gguf=q8_0   # + a checked GGUF for llama.cpp
    python merge_lora.py --adapter_path=... --gguf=bf16 --llama_cpp=llama.cpp           # with your llama.cpp checkout
    python inference_lora.py --model_path=output/qwen3-1.7b-medical-v3 --adapter_path= -q "什么是高血压？"

The base loads in bf16 (or, with MERGE_INTO="dequantized_nf4", as the NF4 weights a QLoRA adapter trained
against, dequantized), never as 4-bit, and the merge runs in float32. The result is checked before it is declared
done: reloaded from disk with plain transformers, it must stay tied (Qwen3's embed_tokens and lm_head are one
matrix, the trained one for v2/v3) and its logits must match base+adapter. The folder is written beside
OUTPUT_DIR and renamed into place only then. merge.json records the val loss, as evaluate.py computes it, of the
adapter on the NF4 base (as training validated it), on the bf16 base (as inference runs it) and of the merged
folder (what ships), so the gap between the validated model and the shipped one is a number.

With GGUF set, the checked folder is also converted by llama.cpp's own convert_hf_to_gguf.py (LLAMA_CPP, or a copy
fetched once from PyPI's llama-cpp-python sdist into ~/.cache/medsft) to OUTPUT_DIR-Q8_0.gguf (-BF16, -F32), which
must embed the folder's chat template, hold its tokens and special ids, and give its logits (medsft/gguf_export.py).
A failed conversion or check writes neither the GGUF nor the folder.
"""
import time
from pathlib import Path

from medsft import chat_format, gguf_export, model_export
from medsft.errors import UserError
from medsft.gguf_export import find_converter, gguf_path_for, gguf_problems, staged_gguf, write_checked_gguf
from medsft.model_export import (adapter_problems, check_examples, check_written_model,
                                 library_versions, load_base_and_adapter, logits_of, merge_adapter, output_problems,
                                 pick_device, quantisation_of, recorded_base, save_model_files, staged_folder,
                                 write_json)
from medsft.records import read_jsonl
from medsft.settings import check_settings, parse_settings, use_run_settings
from medsft.val_loss import measure_loss

# -----------------------------------------------------------------------------
# input
ADAPTER_PATH = "output/qwen3-1.7b-qlora-v3/final"  # OUTPUT_DIR/final of a training run
MODEL_PATH = ""                                    # the base; "" = the one the adapter's run recorded
DEVICE = "auto"                                    # "auto" = the GPU if there is one, else "cpu" (float32 1.7B: ~7 GB)
MERGE_INTO = "bf16"                                # "bf16" base, or "dequantized_nf4": the NF4 weights QLoRA trained on
# output
OUTPUT_DIR = "output/qwen3-1.7b-medical-v3"        # the merged model folder (written atomically)
OVERWRITE = False                                  # True replaces an existing OUTPUT_DIR (and GGUF) once checked
MAX_SHARD_SIZE = "2GB"                             # one model.safetensors up to this size, else shards of it
GGUF = ""                                          # "q8_0", "bf16" or "f32": also write OUTPUT_DIR-Q8_0.gguf etc.
LLAMA_CPP = ""                                     # a llama.cpp checkout to convert with; "" = fetched from PyPI once
# check
DATA_DIR = "data"                                  # val.jsonl's first rows: the check's examples (default: the run's)
CHECK_EXAMPLES = 4                                 # examples whose logits are compared (merged vs base+adapter)
CHECK_MAX_TOKENS = 256                             # tokens per example
MEASURE_EXAMPLES = -1                              # val rows for merge.json's val losses; -1 = 64 on a GPU, 8 on CPU
# -----------------------------------------------------------------------------


def main(argv=None):
    # ========== 1. Settings: every problem reported before the model loads ==========
    cfg = parse_settings(globals(), argv)
    bad_adapter = adapter_problems(cfg.ADAPTER_PATH)
    trained = {} if bad_adapter else use_run_settings(cfg, training_length=True)
    if not cfg.MODEL_PATH and not bad_adapter:
        cfg.MODEL_PATH = recorded_base(cfg.ADAPTER_PATH) or ""  # an adapter without settings.json: PEFT's record
        cfg._origins["MODEL_PATH"] = "from adapter_config.json"
    cfg.print("merge settings")
    gguf_path = gguf_path_for(cfg.OUTPUT_DIR, cfg.GGUF) if cfg.GGUF in gguf_export.GGUF_TYPES else None
    problems = [p for p in [
        *bad_adapter,
        not bad_adapter and not cfg.MODEL_PATH and f"{cfg.ADAPTER_PATH} records no base model; pass --model_path",
        cfg.MODEL_PATH and quantisation_of(cfg.MODEL_PATH) and f"the base {cfg.MODEL_PATH} is a quantised model "
        f"({quantisation_of(cfg.MODEL_PATH)}); merging into it would round the merged weights to its precision; "
        "pass the original bf16 base with --model_path",
        cfg.DEVICE not in ("auto", "cpu", "cuda") and f"device must be 'auto', 'cpu' or 'cuda', not {cfg.DEVICE!r}",
        cfg.DEVICE == "cuda" and not _cuda() and "device is 'cuda' but there is no CUDA GPU",
        cfg.MERGE_INTO not in model_export.MERGE_TARGETS and f"merge_into must be one of "
        f"{', '.join(model_export.MERGE_TARGETS)}, not {cfg.MERGE_INTO!r}",
        cfg.MERGE_INTO == "dequantized_nf4" and trained.get("LOAD_IN_4BIT") is False and f"merge_into is "
        f"'dequantized_nf4' but {cfg.ADAPTER_PATH} was trained on a bf16 base (load_in_4bit False); merge it into bf16",
        cfg.MEASURE_EXAMPLES < -1 and f"measure_examples must be -1 (auto), 0 (none) or more, not "
        f"{cfg.MEASURE_EXAMPLES}",
        cfg.CHECK_EXAMPLES < 1 and f"check_examples must be at least 1, not {cfg.CHECK_EXAMPLES}",
        cfg.CHECK_MAX_TOKENS < 8 and f"check_max_tokens must be at least 8, not {cfg.CHECK_MAX_TOKENS}",
        *output_problems(cfg.OUTPUT_DIR, cfg.OVERWRITE),
        *gguf_problems(cfg.GGUF, cfg.LLAMA_CPP, gguf_path, cfg.OVERWRITE),
    ] if p]
    if len(problems) == 1:  # one problem, one line
        raise UserError(f"error: {problems[0]}")
    check_settings(problems)
    converter = find_converter(cfg.LLAMA_CPP) if gguf_path else None  # fetched (once) before any model loads
    if trained.get("LOAD_IN_4BIT"):
        print(f"note: the adapter was trained on a 4-bit base; it is merged into the {cfg.MERGE_INTO} base, never a "
              "4-bit one (that would round the merged weights to 4 bits)")

    # ========== 2. Val loss as validated (NF4 base + adapter) and as inference runs it (bf16 base + adapter) ==========
    from medsft.model_loading import load_tokenizer, resolve_model_path

    start = time.perf_counter()
    device = pick_device(cfg.DEVICE)
    model_path = resolve_model_path(cfg.MODEL_PATH)
    if quantisation_of(model_path):  # a model id is only known to be quantised once downloaded
        raise UserError(f"error: the base {cfg.MODEL_PATH} is a quantised model ({quantisation_of(model_path)}); "
                        "pass the original bf16 base with --model_path")
    tokenizer = load_tokenizer(model_path)
    measure = val_loss_plan(cfg, trained, device)
    losses = {}
    if measure:
        for name, load_in_4bit in (("nf4_base_plus_adapter", True), ("bf16_base_plus_adapter", False)):
            losses[name] = measure_loss(model_path, cfg.ADAPTER_PATH, load_in_4bit, measure["rows"], tokenizer,
                                        **measure["options"])

    # ========== 3. Base in bf16 or dequantized NF4 (never 4-bit) + the adapter, in float32 ==========
    model, embedding = load_base_and_adapter(model_path, cfg.ADAPTER_PATH, device, cfg.MERGE_INTO)
    print(f"loaded {cfg.MODEL_PATH} ({cfg.MERGE_INTO}) + adapter {cfg.ADAPTER_PATH} on {device} (float32)", flush=True)

    # ========== 4. Reference logits: base+adapter, and the base alone ==========
    examples, source = check_examples(tokenizer, cfg.DATA_DIR, trained.get("SYSTEM_PROMPT", chat_format.SYSTEM_PROMPT),
                                      cfg.CHECK_EXAMPLES, cfg.CHECK_MAX_TOKENS)
    reference = logits_of(model, examples)
    with model.disable_adapter():
        base_logits = logits_of(model, examples)

    # ========== 5. Merge and unload (tied to the trained embedding) ==========
    model = merge_adapter(model)

    # ========== 6. Write to a temporary folder, check it reloaded from disk, measure it, then rename ==========
    with staged_gguf(gguf_path) as gguf_temp, staged_folder(cfg.OUTPUT_DIR, cfg.OVERWRITE) as temp:
        save_model_files(temp, model, tokenizer, trained or None, cfg.MAX_SHARD_SIZE)
        del model
        check = check_written_model(temp, reference, base_logits, examples, embedding, device)
        del reference, base_logits  # 1.7B: 0.6 GB each on 4 examples of 256 tokens
        check["source"] = source
        print(f"check on {len(examples)} examples from {source}: largest logit difference merged vs base+adapter "
              f"{check['max_abs_logit_difference']:.4g} ({100 * check['relative_difference']:.3f}% of the largest "
              f"logit; tolerance {100 * model_export.RELATIVE_TOLERANCE:g}%); the adapter itself moves them by "
              f"{check['adapter_effect']:.4g}; tied: {check['tied']}", flush=True)
        if check["adapter_effect"] <= check["max_abs_logit_difference"]:
            print("note: this adapter barely changes the logits, so the check cannot tell a merged model from the "
                  "bare base; it still checks loading, tying and the embedding")
        if measure:
            losses["merged"] = measure_loss(str(temp), "", False, measure["rows"], tokenizer, **measure["options"])
        val_loss = val_loss_record(losses, measure, trained, cfg.MERGE_INTO)
        # ========== 7. With --gguf: llama.cpp's converter on the checked folder, then check the GGUF ==========
        gguf = gguf_path and write_checked_gguf(temp, gguf_temp, gguf_path, cfg.GGUF, converter, examples, device)
        merge_record = {"base": cfg.MODEL_PATH, "adapter": cfg.ADAPTER_PATH, "merge_into": cfg.MERGE_INTO,
                        "versions": library_versions(), "device": device, "check": check, "val_loss": val_loss,
                        "gguf": gguf or None, "seconds": round(time.perf_counter() - start, 1),
                        "settings": cfg.as_dict()}
        write_json(temp / "merge.json", merge_record)
    print(f"wrote {cfg.OUTPUT_DIR}/ (a plain model folder: no peft needed to load it)")
    if gguf_path:
        print(f"wrote {gguf_path} ({gguf['bytes'] / 1e6:.1f} MB, checked): ollama create with deploy/Modelfile, or "
              "llama-server -m it")
    return merge_record


LOSS_LABELS = {"nf4_base_plus_adapter": "NF4 base + adapter", "bf16_base_plus_adapter": "bf16 base + adapter",
               "merged": "merged folder"}


def val_loss_plan(cfg, trained: dict, device: str) -> dict | None:
    """measure_loss's rows and options: up to MEASURE_EXAMPLES val rows, tokenised as the run trained; None when
    there is nothing to measure (measure_examples 0, or no val.jsonl)."""
    count = cfg.MEASURE_EXAMPLES if cfg.MEASURE_EXAMPLES >= 0 else (64 if device == "cuda" else 8)
    path = Path(cfg.DATA_DIR) / "val.jsonl"
    if count == 0 or not path.is_file():
        print(f"note: no val loss measured ({'measure_examples 0' if count == 0 else f'{path} not found'}); "
              "merge.json cannot say how far the merged model is from the validated one")
        return None
    rows = [row for _, row in read_jsonl(path)][:count]
    print(f"measuring the val loss of 3 models on {len(rows)} rows of {path} (evaluate.py's loss and label mask)",
          flush=True)
    options = {"max_length": trained.get("MAX_LENGTH", 2048), "system_prompt": trained.get("SYSTEM_PROMPT",
               chat_format.SYSTEM_PROMPT), "long_examples": trained.get("LONG_EXAMPLES", "shorten_think"),
               "no_think_fraction": trained.get("NO_THINK_FRACTION", 0.0),
               "batch_size": 1}  # one example per forward: the least memory, the same per-token mean
    return {"rows": rows, "options": options, "source": str(path)}


def val_loss_record(losses: dict, measure: dict | None, trained: dict, merge_into: str) -> dict | None:
    """merge.json's val_loss: the three losses, the rows they used, and each model's gap to the validated one."""
    if not measure:
        return None
    validated = "bf16_base_plus_adapter" if trained.get("LOAD_IN_4BIT") is False else "nf4_base_plus_adapter"
    record = {name: round(result["loss"], 6) for name, result in losses.items()}
    first = losses[validated]
    record |= {"validated": validated, "merge_into": merge_into, "data": measure["source"],
               "rows": len(measure["rows"]), "examples": first["examples"], "tokens": first["tokens"],
               "max_length": measure["options"]["max_length"]}
    gaps = {name: result["loss"] - first["loss"] for name, result in losses.items() if name != validated}
    print(f"val loss on {record['examples']} examples ({record['tokens']} tokens): " + ", ".join(
        f"{LOSS_LABELS[name]} {record[name]:.4f}" + (f" ({gaps[name]:+.4f})" if name in gaps else " (as validated)")
        for name in losses), flush=True)
    return record | {"gap_to_validated": {name: round(gap, 6) for name, gap in gaps.items()}}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()

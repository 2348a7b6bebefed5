"""Merge a LoRA adapter into its base: one plain model folder that vLLM, SGLang, llama.cpp and transformers load.

    python merge_lora.py --adapter_path=output/qwen3-1.7b-qlora-v3/final --output_dir=output/qwen3-1.7b-medical-v3
    python merge_lora.py --adapter_path=output/qwen3-1.7b-qlora-v1/final --output_dir=output/qwen3-1.7b-medical-v1
    python merge_lora.py --adapter_path=... --output_dir=... --overwrite=True   # replace an earlier merge
    python merge_lora.py --model_path=/models/Qwen3-1.7B --adapter_path=... --device=cpu   # a local base, no GPU
    python inference_lora.py --model_path=output/qwen3-1.7b-medical-v3 --adapter_path= -q "什么是高血压？"

The base loads in bf16 even when the adapter was trained on a 4-bit base, and the merge runs in float32. The
result is checked before it is declared done: reloaded from disk with plain transformers, it must stay tied
(Qwen3's embed_tokens and lm_head are one matrix, the trained one for v2/v3) and its logits must match
base+adapter. The folder is written beside OUTPUT_DIR and renamed into place only then.
"""
import time

from medsft import chat_format, model_export
from medsft.errors import UserError
from medsft.model_export import (adapter_problems, check_examples, check_written_model,
                                 library_versions, load_base_and_adapter, logits_of, merge_adapter, output_problems,
                                 pick_device, quantisation_of, recorded_base, save_model_files, staged_folder,
                                 write_json)
from medsft.settings import check_settings, parse_settings, use_run_settings

# -----------------------------------------------------------------------------
# input
ADAPTER_PATH = "output/qwen3-1.7b-qlora-v3/final"  # OUTPUT_DIR/final of a training run
MODEL_PATH = ""                                    # the base; "" = the one the adapter's run recorded
DEVICE = "auto"                                    # "auto": the GPU if there is one, else "cpu"; float32 1.7B needs ~7 GB
# output
OUTPUT_DIR = "output/qwen3-1.7b-medical-v3"        # the merged model folder (written atomically)
OVERWRITE = False                                  # True replaces an existing OUTPUT_DIR once the new one is checked
MAX_SHARD_SIZE = "2GB"                             # size of each model-0000N-of-0000M.safetensors shard
# check
DATA_DIR = "data"                                  # val.jsonl's first rows are the check's examples (else built-in
                                                   # ones); unless given, the adapter's run's DATA_DIR
CHECK_EXAMPLES = 4                                 # examples whose logits are compared (merged vs base+adapter)
CHECK_MAX_TOKENS = 256                             # tokens per example
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
    problems = [p for p in [
        *bad_adapter,
        not bad_adapter and not cfg.MODEL_PATH and f"{cfg.ADAPTER_PATH} records no base model; pass --model_path",
        cfg.MODEL_PATH and quantisation_of(cfg.MODEL_PATH) and f"the base {cfg.MODEL_PATH} is a quantised model "
        f"({quantisation_of(cfg.MODEL_PATH)}); merging into it would round the merged weights to its precision; "
        "pass the original bf16 base with --model_path",
        cfg.DEVICE not in ("auto", "cpu", "cuda") and f"device must be 'auto', 'cpu' or 'cuda', not {cfg.DEVICE!r}",
        cfg.DEVICE == "cuda" and not _cuda() and "device is 'cuda' but there is no CUDA GPU",
        cfg.CHECK_EXAMPLES < 1 and f"check_examples must be at least 1, not {cfg.CHECK_EXAMPLES}",
        cfg.CHECK_MAX_TOKENS < 8 and f"check_max_tokens must be at least 8, not {cfg.CHECK_MAX_TOKENS}",
        *output_problems(cfg.OUTPUT_DIR, cfg.OVERWRITE),
    ] if p]
    if len(problems) == 1:  # one problem, one line
        raise UserError(f"error: {problems[0]}")
    check_settings(problems)
    if trained.get("LOAD_IN_4BIT"):
        print("note: the adapter was trained on a 4-bit base; it is merged into the bf16 base, as it should be "
              "(a 4-bit base would round the merged weights to 4 bits)")

    # ========== 2. Base in bf16 (never 4-bit) + the adapter, in float32 ==========
    from medsft.model_loading import load_tokenizer, resolve_model_path

    start = time.perf_counter()
    device = pick_device(cfg.DEVICE)
    model_path = resolve_model_path(cfg.MODEL_PATH)
    if quantisation_of(model_path):  # a model id is only known to be quantised once downloaded
        raise UserError(f"error: the base {cfg.MODEL_PATH} is a quantised model ({quantisation_of(model_path)}); "
                        "pass the original bf16 base with --model_path")
    tokenizer = load_tokenizer(model_path)
    model, embedding = load_base_and_adapter(model_path, cfg.ADAPTER_PATH, device)
    print(f"loaded {cfg.MODEL_PATH} + adapter {cfg.ADAPTER_PATH} on {device} (float32)", flush=True)

    # ========== 3. Reference logits: base+adapter, and the base alone ==========
    examples, source = check_examples(tokenizer, cfg.DATA_DIR, trained.get("SYSTEM_PROMPT", chat_format.SYSTEM_PROMPT),
                                      cfg.CHECK_EXAMPLES, cfg.CHECK_MAX_TOKENS)
    reference = logits_of(model, examples)
    with model.disable_adapter():
        base_logits = logits_of(model, examples)

    # ========== 4. Merge and unload (tied to the trained embedding) ==========
    model = merge_adapter(model)

    # ========== 5. Write to a temporary folder, check it reloaded from disk, then rename ==========
    with staged_folder(cfg.OUTPUT_DIR, cfg.OVERWRITE) as temp:
        save_model_files(temp, model, tokenizer, trained or None, cfg.MAX_SHARD_SIZE)
        del model
        check = check_written_model(temp, reference, base_logits, examples, embedding, device)
        check["source"] = source
        print(f"check on {len(examples)} examples from {source}: largest logit difference merged vs base+adapter "
              f"{check['max_abs_logit_difference']:.4g} ({100 * check['relative_difference']:.3f}% of the largest "
              f"logit; tolerance {100 * model_export.RELATIVE_TOLERANCE:g}%); the adapter itself moves them by "
              f"{check['adapter_effect']:.4g}; tied: {check['tied']}", flush=True)
        if check["adapter_effect"] <= check["max_abs_logit_difference"]:
            print("note: this adapter barely changes the logits, so the check cannot tell a merged model from the "
                  "bare base; it still checks loading, tying and the embedding")
        merge_record = {"base": cfg.MODEL_PATH, "adapter": cfg.ADAPTER_PATH, "versions": library_versions(),
                        "device": device, "check": check, "seconds": round(time.perf_counter() - start, 1),
                        "settings": cfg.as_dict()}
        write_json(temp / "merge.json", merge_record)
    print(f"wrote {cfg.OUTPUT_DIR}/ (a plain model folder: no peft needed to load it)")
    return merge_record


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()

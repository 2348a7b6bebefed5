"""The dry run's answer to "will it fit?": the estimate (medsft/memory_estimate.py) for the user's data and
settings, at the worst-case micro-batch and at the typical ones, and the first setting to change if it does not.

Two figures, because a GPU run shows two: the torch-visible peak (what torch.cuda.max_memory_reserved() and
summary.json's peak_gpu_mem_gib report) and the device total (what the whole card holds, as nvidia-smi and
torch.cuda.mem_get_info() see it): the torch-visible peak plus a paged optimizer's states in CUDA managed memory
and the CUDA context.
"""
import random

from medsft.memory_estimate import (GB, TOKENS_MODE_COPIES, Estimate, batch_tokens, estimate_memory,
                                    example_lengths, gpu_memory_budget, recipe_of, tensor_table)


def settings_with(cfg, **changes):
    from medsft.settings import Settings

    return Settings(**{**vars(cfg), **changes})


def micro_batch_percentiles(lengths: tuple[list[int], list[int]], cfg, percentiles=(50, 90)) -> list[int]:
    """Tokens of the training micro-batches a run draws (the examples shuffled with SEED, BATCH_SIZE at a time,
    packed or padded as the collator does), at each percentile: what a typical step holds, beside the worst case."""
    train_lengths = list(lengths[0])
    draw, sizes = random.Random(cfg.SEED), []
    for _ in range(max(1, round(getattr(cfg, "EPOCHS", 1) or 1))):
        draw.shuffle(train_lengths)
        for i in range(0, len(train_lengths), cfg.BATCH_SIZE):
            batch = train_lengths[i:i + cfg.BATCH_SIZE]
            sizes.append(sum(batch) if cfg.PACKING else len(batch) * -(-max(batch) // 8) * 8)
    sizes.sort()
    return [sizes[min(len(sizes) - 1, len(sizes) * p // 100)] for p in percentiles]


def verdict(device_total: int, paged: int, budget: float) -> str:
    """"fits", "spills" (the torch-visible peak and the CUDA context fit, the paged states do not: the driver moves
    them to host memory, which is slower but no out-of-memory) or "does NOT fit"."""
    if device_total <= budget * GB:
        return "fits"
    if paged and device_total - paged <= budget * GB:
        return "spills"
    return "does NOT fit"


def verdict_text(fit: str, paged: int) -> str:
    """The verdict as the dry run prints it."""
    return {"fits": "fits.", "does NOT fit": "does NOT fit.",
            "spills": f"fits, but the paged optimizer states ({paged / GB:.2f} GB) spill to host memory: slower "
                      "steps, not an out-of-memory."}[fit]


def fixes(cfg) -> list[tuple[str, dict]]:
    """Settings that lower the peak, in the order to try them: the cheapest in speed and quality first."""
    options = []
    if not cfg.USE_LIGER_KERNEL:
        options.append(("--use_liger_kernel=True", {"USE_LIGER_KERNEL": True}))
    if not cfg.GRADIENT_CHECKPOINTING:
        options.append(("--gradient_checkpointing=True", {"GRADIENT_CHECKPOINTING": True}))
    if getattr(cfg, "EMBEDDING_MODE", None) == "full" and cfg.MODULES_TO_SAVE:
        options.append(("--embedding_mode=tokens", {"EMBEDDING_MODE": "tokens"}))
    if hasattr(cfg, "LORA_R") and not cfg.LOAD_IN_4BIT:
        options.append(("--load_in_4bit=True", {"LOAD_IN_4BIT": True}))
    batch, accumulation = cfg.BATCH_SIZE, cfg.GRADIENT_ACCUMULATION
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        options.append((f"--batch_size={batch} --gradient_accumulation={accumulation}",
                        {"BATCH_SIZE": batch, "GRADIENT_ACCUMULATION": accumulation}))
    size = cfg.EVAL_BATCH_SIZE
    while size > 1:
        size //= 2
        options.append((f"--eval_batch_size={size}", {"EVAL_BATCH_SIZE": size}))
    return options


def print_memory_estimate(model_path: str, cfg, data) -> Estimate:
    """The dry run's answer to "will it fit?", for one CUDA GPU, and the first setting to change if not."""
    from transformers import AutoConfig

    from medsft.training import trained_token_indices

    config = AutoConfig.from_pretrained(model_path)
    budget = gpu_memory_budget(getattr(cfg, "GPU_MEMORY_GB", 0))
    tokens_mode = hasattr(cfg, "EMBEDDING_MODE") and bool(cfg.MODULES_TO_SAVE)
    # the rows "tokens" would train (counted once: v3 tokenises every question masked), also for a "full" run
    token_rows = len(trained_token_indices(data, settings_with(cfg, EMBEDDING_MODE="tokens"))) if tokens_mode else None
    rows = token_rows if getattr(cfg, "EMBEDDING_MODE", None) == "tokens" else None

    lengths = example_lengths(data)

    def estimate(settings, train=None):
        worst, evaluation = batch_tokens(lengths, settings)
        trained = token_rows if getattr(settings, "EMBEDDING_MODE", None) == "tokens" else None
        return estimate_memory(config, settings, "cuda", worst if train is None else train, evaluation,
                               trained), worst, evaluation

    result, train, evaluation = estimate(cfg)
    p50, p90 = micro_batch_percentiles(lengths, cfg)
    typical = {name: estimate(cfg, tokens)[0] for name, tokens in (("p50", p50), ("p90", p90))}
    result.typical = {name: {"tokens": tokens, "torch_peak": typical[name].torch_peak,
                             "device_total": typical[name].device_total}
                      for name, tokens in (("p50", p50), ("p90", p90))}
    recipe = {"qlora": "QLoRA (4-bit NF4 base, fp32 LoRA)", "bf16_lora": "LoRA on a bf16 base",
              "full": f"full fine-tuning ({'fp32' if getattr(cfg, 'FP32_WEIGHTS', False) else 'bf16'} weights)"}
    parameters = sum(numel for _, numel, _, _ in tensor_table(config)[0])
    print("==== will it fit? estimated peak memory of one CUDA GPU (bf16 compute), before any weight loads ====")
    print(f"{getattr(config, 'model_type', 'model')}: {parameters:,} parameters, {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size:,}, vocabulary {config.vocab_size:,}; {recipe[recipe_of(cfg)]}, "
          f"optim {cfg.OPTIM}")
    print(f"worst-case micro-batch: {train:,} tokens ({cfg.BATCH_SIZE} longest examples, "
          f"{'packed' if cfg.PACKING else 'padded'}); typical: p50 {p50:,}, p90 {p90:,} tokens (the run's draws); "
          f"longest eval micro-batch: {evaluation:,} trained positions")
    gb = lambda n: f"{n / GB:6.2f} GB"  # noqa: E731
    parts, other = result.parts, result.alternatives
    checkpointing = "on" if cfg.GRADIENT_CHECKPOINTING else "off"
    liger = "Liger fused loss" if cfg.USE_LIGER_KERNEL else "full logits, --use_liger_kernel=False"
    lines = [
        ("weights (frozen)" if recipe_of(cfg) != "full" else "weights (frozen buffers)", parts["weights"], ""),
        ("adapter and trainable rows" if recipe_of(cfg) != "full" else "trained weights", parts["trainable"],
         f"{rows:,} embedding rows" if rows else ""),
        ("optimizer states", parts["optimizer"] - result.paged,
         "32-bit states for the embedding: bitsandbytes" if "8bit" in cfg.OPTIM and cfg.OPTIM != "adamw_torch_8bit"
         and getattr(cfg, "EMBEDDING_MODE", None) == "full" and cfg.MODULES_TO_SAVE else ""),
        ("gradients", parts["gradients"], ""),
        (f"activations (checkpointing {checkpointing})", parts["activations"],
         f"{'off' if cfg.GRADIENT_CHECKPOINTING else 'on'}: {other['activations'] / GB:.2f} GB"),
        (f"logits ({liger})", parts["logits"],
         f"{'without' if cfg.USE_LIGER_KERNEL else 'with'} Liger: {other['logits'] / GB:.2f} GB"),
    ]
    if "merged rows" in parts:
        lines.append(("merged embedding copies (tokens mode)", parts["merged rows"],
                      f"{TOKENS_MODE_COPIES} x vocab x hidden"))
    if "liger lm_head grad" in parts:
        lines.append(("Liger's lm_head gradient", parts["liger lm_head grad"], "vocab x hidden"))
    lines += [("evaluation step (torch-visible)", result.eval_peak - result.outside_torch,
               "no gradients; logits of the trained positions"),
              ("torch-visible peak", result.torch_peak, "compare: torch.cuda.max_memory_reserved()"),
              ("paged optimizer states", result.paged, "CUDA managed memory: not in torch's counters"),
              ("CUDA context", parts["cuda context"], "outside torch's count"),
              ("device total", result.device_total, "compare: torch.cuda.mem_get_info() used")]
    for name, value, note in lines:
        print(f"  {name:<48} {gb(value)}" + (f"   ({note})" if note else ""))
    for name, tokens in (("p50", p50), ("p90", p90)):
        print(f"  typical micro-batch {name}, {tokens:,} tokens: torch-visible {typical[name].torch_peak / GB:.2f} GB, "
              f"device total {typical[name].device_total / GB:.2f} GB")
    for note in result.notes:
        print(f"  note: {note}")
    fit = verdict(result.device_total, result.paged, budget)
    print(f"estimated for the worst case: torch-visible peak {result.torch_peak / GB:.2f} GB, device total "
          f"{result.device_total / GB:.2f} GB of {budget:.1f} GB (gpu_memory_gb): " + verdict_text(fit, result.paged)
          + " Weights, optimizer states and gradients are counted exactly; activations and logits are a formula "
            "checked on CPU, not measured on a GPU")
    if fit == "does NOT fit":
        chosen, settings = [], cfg
        for flag, change in fixes(cfg):
            settings = settings_with(settings, **change)
            chosen.append(flag)
            after, _, _ = estimate(settings)
            if verdict(after.device_total, after.paged, budget) != "does NOT fit":
                print(f"to fit, change first: {chosen[0]}"
                      + (f"; then {', '.join(chosen[1:])}" if len(chosen) > 1 else "")
                      + f" (estimated device total {after.device_total / GB:.2f} GB)")
                break
        else:
            advice = ("use train_lora.py (QLoRA), or a smaller model" if recipe_of(cfg) == "full"
                      else "lower --max_length, or use a smaller model")
            print(f"even with {', '.join(chosen) or 'the current settings'} it does not fit: {advice}")
    print("====", flush=True)
    return result

"""Will GRPO fit? Peak GPU memory of a train_grpo.py run, estimated before any weight loads (the dry run).

Built on medsft/memory_estimate.py's parts, counted as there: the static parts (4-bit weights, the adapter, its
optimizer states and gradients) exactly from the meta model; the rest a formula, not measured:
- generation: the KV cache of one generation batch, BATCH_SIZE x GRADIENT_ACCUMULATION sequences per GPU (TRL
  generates a whole step's completions at once: NUM_GENERATIONS per question), each prompt + completion tokens,
  x layers x KV heads x head dim x 2 (keys and values) x bytes;
- the policy's forward and backward over one micro-batch of BATCH_SIZE sequences, with checkpointing or without;
- the log-probabilities: TRL 1.16's fused LM head scores the completion tokens in [4,096 x 32,768] tiles and never
  holds the [tokens, vocabulary] logits (shown beside it: what the whole logits would take);
- the greedy held-out evaluation: EVAL_BATCH_SIZE sequences' KV cache.
The peak is the static parts plus the largest of the three phases (each frees its memory before the next), given
twice as for SFT: the torch-visible peak (compare torch.cuda.max_memory_reserved) and the device total, which adds
a paged optimizer's states in CUDA managed memory and the CUDA context (compare torch.cuda.mem_get_info's used).
"""
from medsft.memory_estimate import (CUDA_CONTEXT_BYTES, GB, Layout, activation_bytes, gpu_memory_budget,
                                    logit_bytes, paged_optimizer_bytes, static_parts)
from medsft.memory_report import settings_with, verdict, verdict_text

TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768  # trl/kernels/chunked_logprob.py's tiles (TRL 1.16)


def kv_cache_bytes(config, sequences: int, tokens_each: int, compute_bytes: int = 2) -> int:
    """Keys and values of every layer for `sequences` rows of `tokens_each` tokens."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return sequences * tokens_each * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2 \
        * compute_bytes


def fused_logprob_bytes(config, layout: Layout, completion_tokens: int) -> int:
    """TRL's chunked log-probabilities: one [token tile, vocab tile] of logits in the compute dtype and its fp32
    softmax statistics, plus the hidden states' gradient."""
    tile = min(completion_tokens, TRL_TOKEN_TILE) * min(config.vocab_size, TRL_VOCAB_TILE)
    return tile * (layout.compute_bytes + 4) + completion_tokens * config.hidden_size * 4


def estimate_grpo_memory(config, cfg, prompt_tokens: int, device: str = "cuda") -> dict:
    """{part: bytes} and the phases' peaks of one GPU for the run's settings and its longest prompt."""
    layout = Layout(device, "qlora" if cfg.LOAD_IN_4BIT else "bf16_lora")
    a = layout.compute_bytes
    static = static_parts(config, cfg, layout)
    paged = paged_optimizer_bytes(config, cfg, layout)
    sequence = prompt_tokens + cfg.MAX_COMPLETION_LENGTH
    generation_batch = cfg.BATCH_SIZE * cfg.GRADIENT_ACCUMULATION
    micro_tokens = cfg.BATCH_SIZE * sequence
    completion_tokens = cfg.BATCH_SIZE * cfg.MAX_COMPLETION_LENGTH
    phases = {
        # the last position's logits (fp32 for sampling) for every sequence, besides the cache
        "generation": kv_cache_bytes(config, generation_batch, sequence, a) + generation_batch * config.vocab_size * 4,
        "training": activation_bytes(config, cfg, layout, micro_tokens, cfg.GRADIENT_CHECKPOINTING)
        + fused_logprob_bytes(config, layout, completion_tokens),
        "evaluation": kv_cache_bytes(config, cfg.EVAL_BATCH_SIZE, sequence, a)
        + cfg.EVAL_BATCH_SIZE * config.vocab_size * 4,
    }
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    common = sum(static.values()) + context
    return {
        "static": static, "phases": phases, "common": common,
        "peaks": {name: common + value for name, value in phases.items()},
        "peak": common + max(phases.values()),  # the device total
        "paged": paged, "cuda_context": context,
        "torch_visible_peak": common + max(phases.values()) - paged - context,
        "generation_batch": generation_batch, "sequence": sequence, "micro_tokens": micro_tokens,
        "alternatives": {
            "activations": activation_bytes(config, cfg, layout, micro_tokens, not cfg.GRADIENT_CHECKPOINTING),
            "whole logits": logit_bytes(config, layout, completion_tokens, liger=False),
        },
    }


def adapter_lora_settings(cfg):
    """The settings the estimate counts the adapter with: SFT_ADAPTER's own rank and targets when it has them."""
    import json
    from pathlib import Path


    config_file = Path(cfg.SFT_ADAPTER or "-") / "adapter_config.json"
    if not config_file.is_file():
        return cfg
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    targets = saved.get("target_modules") or cfg.TARGET_MODULES
    return settings_with(cfg, LORA_R=saved.get("r", cfg.LORA_R), TARGET_MODULES=sorted(targets),
                 LORA_DROPOUT=saved.get("lora_dropout", cfg.LORA_DROPOUT), MODULES_TO_SAVE=[])


def print_grpo_memory_estimate(model_path: str, cfg, prompt_tokens: int) -> dict:
    """The dry run's answer to "will GRPO fit?" on one CUDA GPU."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    settings = adapter_lora_settings(cfg)
    result = estimate_grpo_memory(config, settings, prompt_tokens)
    budget = gpu_memory_budget(getattr(cfg, "GPU_MEMORY_GB", 0))
    gb = lambda n: f"{n / GB:6.2f} GB"  # noqa: E731
    static, phases, other = result["static"], result["phases"], result["alternatives"]
    print("==== will GRPO fit? estimated peak memory of one CUDA GPU (bf16 compute), before any weight loads ====")
    print(f"{config.num_hidden_layers} layers, hidden {config.hidden_size:,}, vocabulary {config.vocab_size:,}, "
          f"{config.num_key_value_heads} KV heads; LoRA r={settings.LORA_R} on {len(settings.TARGET_MODULES)} "
          f"projections, {'4-bit NF4' if cfg.LOAD_IN_4BIT else 'bf16'} base, beta {cfg.BETA} "
          f"({'no reference model' if cfg.BETA == 0 else 'a reference adapter'})")
    print(f"sequences: the longest prompt ({prompt_tokens:,} tokens) + max_completion_length "
          f"({cfg.MAX_COMPLETION_LENGTH:,}) = {result['sequence']:,} tokens; a generation batch of "
          f"{result['generation_batch']} sequences ({cfg.BATCH_SIZE} x {cfg.GRADIENT_ACCUMULATION}: "
          f"{result['generation_batch'] // cfg.NUM_GENERATIONS} questions x {cfg.NUM_GENERATIONS} generations); "
          f"micro-batches of {cfg.BATCH_SIZE}")
    lines = [("weights (frozen)", static["weights"], ""), ("adapter", static["trainable"], ""),
             ("optimizer states", static["optimizer"], cfg.OPTIM), ("gradients", static["gradients"], ""),
             ("CUDA context", CUDA_CONTEXT_BYTES, "outside torch's count"),
             ("generation: KV cache + sampling logits", phases["generation"],
              f"{result['generation_batch']} x {result['sequence']:,} tokens"),
             (f"training: activations (checkpointing {'on' if cfg.GRADIENT_CHECKPOINTING else 'off'}) + log-probs",
              phases["training"], f"checkpointing {'off' if cfg.GRADIENT_CHECKPOINTING else 'on'}: activations "
              f"{other['activations'] / GB:.2f} GB; TRL's tiled LM head instead of the whole logits "
              f"({other['whole logits'] / GB:.2f} GB)"),
             ("evaluation: greedy KV cache", phases["evaluation"], f"{cfg.EVAL_BATCH_SIZE} x {result['sequence']:,}")]
    for name, value, note in lines:
        print(f"  {name:<62} {gb(value)}" + (f"   ({note})" if note else ""))
    for name, value in result["peaks"].items():
        print(f"  {name + ' peak':<62} {gb(value)}")
    print(f"  {'torch-visible peak':<62} {gb(result['torch_visible_peak'])}   (compare: "
          "torch.cuda.max_memory_reserved())")
    print(f"  {'of the optimizer states, paged':<62} {gb(result['paged'])}   (CUDA managed memory: not in torch's "
          "counters)")
    print(f"  {'device total':<62} {gb(result['peak'])}   (compare: torch.cuda.mem_get_info() used)")
    fit = verdict(result["peak"], result["paged"], budget)
    print(f"estimated peak: torch-visible {result['torch_visible_peak'] / GB:.2f} GB, device total "
          f"{result['peak'] / GB:.2f} GB of {budget:.1f} GB (gpu_memory_gb): {verdict_text(fit, result['paged'])} "
          "Static parts are counted exactly; the KV cache, activations and log-prob tiles are a formula, not measured")
    if fit == "does NOT fit":
        largest = max(phases, key=phases.get)
        advice = {"generation": "lower --gradient_accumulation (a smaller generation batch) or "
                                "--max_completion_length", "training": "lower --batch_size (raise "
                                "--gradient_accumulation to keep the step)", "evaluation": "lower --eval_batch_size"}
        print(f"to fit, change first: {advice[largest]}")
    print("====", flush=True)
    return result

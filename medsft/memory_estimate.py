"""Will it fit? Peak GPU memory of a training run, estimated before any weight is downloaded or loaded.

The model is built on PyTorch's meta device from its config.json alone (shapes, no data), and every tensor the
run will hold is counted in the dtype it will have there: the frozen weights (4-bit NF4 with its quantisation
state, or bf16), the trainable weights (LoRA, embedding rows, or all of them for train.py), the optimizer's
states (bitsandbytes keeps 32-bit states for small tensors and for every nn.Embedding, 8-bit for the rest;
torchao likewise), and the gradients. Those static parts are checked against the bytes of real tensors on CPU
(tests/test_memory_estimate.py). Activations and logits are a formula from the longest packed micro-batch the
data can give; they are not measured yet.
"""
import functools
import json
import math
from dataclasses import dataclass, field
from medsft.losses import EVAL_LOSS_CHUNK

GB = 1e9
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CUDA_CONTEXT_BYTES = int(0.5 * GB)  # CUDA context and allocator slack: outside torch's count, typically 0.3-0.6 GB
TOKENS_MODE_COPIES = 3  # "tokens": the merged weight kept for lm_head's backward, its gradient, the embedding's gradient
BNB_MIN_8BIT_SIZE, OPTIMIZER_BLOCK = 4096, 256  # bitsandbytes and torchao: smaller tensors keep 32-bit states


@dataclass
class Layout:
    """Where and in which dtypes a recipe runs: on "cuda" (bf16 compute), or on "cpu" as the product runs there."""
    device: str
    recipe: str  # "qlora", "bf16_lora" or "full" (train.py)
    full_bytes: int = 2  # train.py's weights: bf16, or fp32 with FP32_WEIGHTS

    @property
    def compute_bytes(self) -> int:
        return 2 if self.device == "cuda" else 4  # on CPU there is no autocast: fp32

    @property
    def weight_bytes(self) -> int:
        """Frozen weights that are not 4-bit (QLoRA: the norms, which prepare_model_for_kbit_training widens)."""
        if self.recipe == "full":
            return self.full_bytes
        if self.recipe == "qlora":
            return 4
        return 2 if self.device == "cuda" else 4  # on CPU the bf16-LoRA model is widened to fp32

    @property
    def embedding_bytes(self) -> int:
        """The frozen embedding: prepare_model_for_kbit_training widens it to fp32; on CUDA it is kept bf16."""
        if self.recipe == "full":
            return self.full_bytes
        return 2 if self.device == "cuda" else 4

    @property
    def residual_bytes(self) -> int:
        """The residual stream: fp32 from QLoRA's (widened) embedding output, else the compute dtype."""
        return 4 if self.recipe == "qlora" else self.compute_bytes


@dataclass
class Estimate:
    parts: dict  # name -> bytes, each counted in the peak
    alternatives: dict = field(default_factory=dict)  # name -> bytes of what the other setting would take
    notes: list = field(default_factory=list)
    train_peak: int = 0
    eval_peak: int = 0
    eval_transient: int = 0

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.eval_peak)


def recipe_of(cfg) -> str:
    if not hasattr(cfg, "LORA_R"):
        return "full"
    return "qlora" if cfg.LOAD_IN_4BIT else "bf16_lora"


def meta_model(config):
    """The model built on the meta device: every shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@functools.cache
def _tensor_table(config_json: str) -> tuple[list, list]:
    """([(parameter name, numel, shape, is a decoder-layer nn.Linear weight)], [buffer numels]) of the meta model;
    a tied lm_head is the embedding, listed once."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads(config_json))
    model = meta_model(config)
    modules = dict(model.named_modules())
    params = []
    for name, param in model.named_parameters():
        module = modules[name.rsplit(".", 1)[0]]
        linear = isinstance(module, torch.nn.Linear) and ".layers." in f".{name}."
        params.append((name, param.numel(), tuple(param.shape), linear))
    return params, [buffer.numel() for buffer in model.buffers()]


def tensor_table(config) -> tuple[list, list]:
    return _tensor_table(config.to_json_string(use_diff=False))


def nf4_bytes(numel: int) -> int:
    """An NF4 weight with double quantisation: 4 bits a value, a uint8 absmax per 64 values, an fp32 absmax per
    256 of those, their 256-entry code, the 16-entry NF4 code and an fp32 offset."""
    blocks = math.ceil(numel / 64)
    return numel // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 4


def optimizer_state_bytes(optim: str, numel: int, param_bytes: int, embedding: bool) -> int:
    """Bytes of one parameter's optimizer state, as the library allocates it."""
    states = 1 if "lion" in optim else 3 if "ademamix" in optim else 2
    if optim in ("adamw_torch_8bit", "adamw_torch_4bit"):  # torchao: quantised when big and block-aligned
        block = 256 if optim.endswith("8bit") else 128
        if numel >= BNB_MIN_8BIT_SIZE and numel % block == 0:
            code_bytes = numel if optim.endswith("8bit") else numel // 2
            qmap = 4 * (256 if optim.endswith("8bit") else 16)
            return states * (code_bytes + 4 * (numel // block) + qmap) + 4  # + the fp32 step
        return states * numel * param_bytes + 4
    if "8bit" in optim:  # bitsandbytes: 32-bit for nn.Embedding (transformers' override) and small tensors
        if embedding or numel < BNB_MIN_8BIT_SIZE:
            return states * numel * 4
        return states * (numel + 4 * math.ceil(numel / OPTIMIZER_BLOCK))
    if "bnb" in optim or "paged" in optim or optim.endswith("32bit"):
        return states * numel * 4
    return states * numel * param_bytes + (4 if optim.startswith("adamw_torch") else 0)


def _bnb_8bit(optim: str) -> bool:
    return "8bit" in optim and optim not in ("adamw_torch_8bit",)


def static_parts(config, cfg, layout: Layout, trained_rows: int | None = None) -> dict:
    """{weights, trainable, optimizer, gradients} in bytes, from the meta model and the settings."""
    params, buffers = tensor_table(config)
    hidden, vocab = config.hidden_size, config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding_modules = {"embed_tokens"} | (set() if tied else {"lm_head"})
    weights = trainable = optimizer = gradients = 0
    states_32bit_shared = 0
    optim = cfg.OPTIM

    def add_trainable(numel, nbytes, embedding=False):
        nonlocal trainable, optimizer, gradients
        trainable += numel * nbytes
        gradients += numel * nbytes
        optimizer += optimizer_state_bytes(optim, numel, nbytes, embedding)

    weights += 4 * sum(buffers)  # rotary inverse frequencies: fp32
    for name, numel, shape, linear in params:
        short = name.rsplit(".", 2)[-2]
        if layout.recipe == "full":
            add_trainable(numel, layout.full_bytes)
            continue
        if layout.recipe == "qlora" and linear:
            weights += nf4_bytes(numel)
        elif short in embedding_modules:
            weights += numel * layout.embedding_bytes
        else:
            weights += numel * layout.weight_bytes
        if short in LORA_TARGETS and short in cfg.TARGET_MODULES:
            out_features, in_features = shape
            add_trainable(cfg.LORA_R * in_features, 4)
            add_trainable(out_features * cfg.LORA_R, 4)
    if layout.recipe != "full" and {"embed_tokens", "lm_head"} & set(cfg.MODULES_TO_SAVE):
        copies = 1 if tied else len({"embed_tokens", "lm_head"} & set(cfg.MODULES_TO_SAVE))
        if trained_rows:  # "tokens": a trainable [rows, hidden] delta and its frozen original, per matrix
            for _ in range(copies):
                add_trainable(trained_rows * hidden, 4)
                weights += trained_rows * hidden * layout.embedding_bytes
        else:  # "full": a trainable fp32 copy of the whole matrix (an nn.Embedding: bitsandbytes keeps 32-bit)
            for _ in range(copies):
                add_trainable(vocab * hidden, 4, embedding=True)
    if _bnb_8bit(optim):
        states_32bit_shared = 2 * 256 * 4  # bitsandbytes' two quantisation maps, shared by every parameter
    return {"weights": weights, "trainable": trainable, "optimizer": optimizer + states_32bit_shared,
            "gradients": gradients}


def activation_bytes(config, cfg, layout: Layout, tokens: int, checkpointing: bool) -> int:
    """Activations kept for the backward pass (a formula, not measured): every layer's, or with checkpointing
    each layer's input plus one layer recomputed at a time."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    a, rs = layout.compute_bytes, layout.residual_bytes
    q, kv = heads * head_dim, kv_heads * head_dim
    per_token = (2 * rs * hidden  # residual stream in, after attention
                 + 2 * (4 * hidden + a * hidden)  # two RMSNorms: fp32 internals and output
                 + a * (q + 2 * kv) + 2 * 4 * (q + kv) + a * (q + kv) + a * q  # q/k/v, q/k norms, rope, attention out
                 + 4 * a * inter)  # gate, up, silu(gate), their product
    lora = hasattr(cfg, "LORA_R")
    if lora:
        inputs = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": q, "gate_proj": hidden,
                  "up_proj": hidden, "down_proj": inter}
        targets = [t for t in cfg.TARGET_MODULES if t in inputs]
        if cfg.LORA_DROPOUT > 0:  # each target's dropout makes its own copy of the input, and a mask
            per_token += sum((a + 1) * inputs[t] for t in targets)
        per_token += a * cfg.LORA_R * len(targets)
    one_layer = tokens * per_token
    head = tokens * hidden * (4 + a)  # the final norm and the lm_head input
    if checkpointing:
        return layers * tokens * hidden * rs + one_layer + head
    return layers * one_layer + head


def logit_bytes(config, layout: Layout, tokens: int, liger: bool) -> int:
    """The loss's logits: without Liger the whole [tokens, vocab] in the compute dtype, an fp32 copy and its
    gradient; with Liger's fused linear cross-entropy one chunk of rows at a time, and the input's gradient."""
    vocab, hidden, a = config.vocab_size, config.hidden_size, layout.compute_bytes
    if not liger:
        return tokens * vocab * (a + 4 + 4)
    chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / hidden)))))
    return chunk * vocab * (a + 4) + tokens * hidden * a


def lm_head_trained(cfg, layout: Layout) -> bool:
    return layout.recipe == "full" or bool({"embed_tokens", "lm_head"} & set(getattr(cfg, "MODULES_TO_SAVE", [])))


def estimate_memory(config, cfg, device: str = "cuda", train_tokens: int = 0, eval_tokens: int = 0,
                    trained_rows: int | None = None) -> Estimate:
    """The estimate for one GPU (each DDP process holds the same): static parts, then the larger of the
    training step's and the evaluation's transient memory."""
    layout = Layout(device, recipe_of(cfg), 4 if getattr(cfg, "FP32_WEIGHTS", False) else 2)
    static = static_parts(config, cfg, layout, trained_rows)
    liger = cfg.USE_LIGER_KERNEL and device == "cuda"
    checkpointing = cfg.GRADIENT_CHECKPOINTING
    vocab, hidden = config.vocab_size, config.hidden_size
    parts = dict(static)
    parts["activations"] = activation_bytes(config, cfg, layout, train_tokens, checkpointing)
    parts["logits"] = logit_bytes(config, layout, train_tokens, liger)
    alternatives = {"activations": activation_bytes(config, cfg, layout, train_tokens, not checkpointing),
                    "logits": logit_bytes(config, layout, train_tokens, not liger) if device == "cuda" else None}
    notes = []
    if trained_rows:
        parts["merged rows"] = TOKENS_MODE_COPIES * vocab * hidden * layout.embedding_bytes
        notes.append(f"embedding_mode='tokens': PEFT builds the merged [{vocab:,} x {hidden:,}] weight on every "
                     f"access; counted {TOKENS_MODE_COPIES} copies (the one lm_head keeps for backward and two "
                     "gradients)")
    if liger and lm_head_trained(cfg, layout):
        # the gradient has the dtype of the weight Liger is handed: the merged copy ("tokens"), the fp32
        # trainable copy ("full"), or train.py's own weight
        grad_bytes = layout.embedding_bytes if trained_rows else 4 if layout.recipe != "full" else layout.full_bytes
        parts["liger lm_head grad"] = vocab * hidden * grad_bytes
        notes.append("Liger's fused loss allocates a full [vocab, hidden] gradient for a trained lm_head")
    if device == "cuda":
        parts["cuda context"] = CUDA_CONTEXT_BYTES
    # evaluation: no gradients, no activations kept; the logits of the trained positions, then an fp32 copy
    # and the log-softmax of EVAL_LOSS_CHUNK of them at a time (and in "tokens" mode one merged weight)
    eval_transient = eval_tokens * vocab * layout.compute_bytes \
        + min(eval_tokens, EVAL_LOSS_CHUNK) * vocab * (layout.compute_bytes + 4 + 4) \
        + (vocab * hidden * layout.embedding_bytes if trained_rows else 0)
    common = static["weights"] + static["trainable"] + static["optimizer"] + parts.get("cuda context", 0)
    return Estimate(parts, alternatives, notes, train_peak=sum(parts.values()), eval_peak=common + eval_transient,
                    eval_transient=eval_transient)


def gpu_memory_budget(setting: float) -> float:
    """GPU_MEMORY_GB: the setting if positive, else the visible GPU's memory, else 16 (GB)."""
    if setting and setting > 0:
        return float(setting)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GB
    return 16.0


def counted_bytes(model, optimizer=None) -> dict:
    """The bytes real tensors hold, in the estimate's parts (each storage once): what the tests and a GPU run
    check the estimate against."""
    seen = set()

    def size(tensor) -> int:
        if tensor is None or not hasattr(tensor, "untyped_storage"):
            return 0
        if hasattr(tensor, "__tensor_flatten__") and type(tensor).__name__ != "Params4bit":  # torchao's states
            names, _ = tensor.__tensor_flatten__()
            return sum(size(getattr(tensor, n)) for n in names)
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()

    def quant_state(param) -> int:
        state = getattr(param, "quant_state", None)
        if state is None:
            return 0
        nested = getattr(state, "state2", None)
        return sum(size(t) for t in (state.absmax, state.code, getattr(state, "offset", None),
                                     nested and nested.absmax, nested and nested.code))

    params = list(model.parameters())
    trainable = sum(size(p) for p in params if p.requires_grad)
    gradients = sum(size(p.grad) for p in params if p.requires_grad)
    weights = sum(size(p) + quant_state(p) for p in params if not p.requires_grad)
    weights += sum(size(b) for b in model.buffers())
    states = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            states += sum(size(v) for v in state.values() if hasattr(v, "untyped_storage"))
    return {"weights": weights, "trainable": trainable, "optimizer": states, "gradients": gradients}


# ---------------------------------------------------------------------------------------------------------
# the dry run's report


def example_lengths(data) -> tuple[list[int], list[int]]:
    """(token counts of the training examples, longest first; trained positions of each val example, in order)."""
    train_set, val_set = data.train_set, data.val_set
    if hasattr(train_set, "lengths"):  # read from the examples as tokenized once (v3: this epoch's draws)
        train = sorted(map(int, train_set.lengths()), reverse=True)
    else:
        train = sorted((len(train_set[i]["input_ids"]) for i in range(len(train_set))), reverse=True)
    if hasattr(val_set, "trained_counts"):
        return train, list(map(int, val_set.trained_counts()))
    return train, [sum(label != -100 for label in e["labels"]) for e in val_set]


def batch_tokens(lengths: tuple[list[int], list[int]], cfg) -> tuple[int, int]:
    """(tokens of the longest training micro-batch the data can give: the BATCH_SIZE longest examples packed
    together, or padded; trained positions of the longest evaluation micro-batch, whose batches are fixed)."""
    train_lengths, trained = lengths
    longest = train_lengths[:cfg.BATCH_SIZE]
    train = sum(longest) if cfg.PACKING else len(longest) * -(-longest[0] // 8) * 8
    size = cfg.EVAL_BATCH_SIZE
    batches = [trained[i:i + size] for i in range(0, len(trained), size)]
    evaluation = max(sum(b) if cfg.PACKING else len(b) * max(b) for b in batches)
    return train, evaluation


def _with(cfg, **changes):
    from medsft.settings import Settings

    return Settings(**{**vars(cfg), **changes})


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
    token_rows = len(trained_token_indices(data, _with(cfg, EMBEDDING_MODE="tokens"))) if tokens_mode else None
    rows = token_rows if getattr(cfg, "EMBEDDING_MODE", None) == "tokens" else None

    lengths = example_lengths(data)

    def estimate(settings):
        train, evaluation = batch_tokens(lengths, settings)
        trained = token_rows if getattr(settings, "EMBEDDING_MODE", None) == "tokens" else None
        return estimate_memory(config, settings, "cuda", train, evaluation, trained), train, evaluation

    result, train, evaluation = estimate(cfg)
    recipe = {"qlora": "QLoRA (4-bit NF4 base, fp32 LoRA)", "bf16_lora": "LoRA on a bf16 base",
              "full": f"full fine-tuning ({'fp32' if getattr(cfg, 'FP32_WEIGHTS', False) else 'bf16'} weights)"}
    parameters = sum(numel for _, numel, _, _ in tensor_table(config)[0])
    print("==== will it fit? estimated peak memory of one CUDA GPU (bf16 compute), before any weight loads ====")
    print(f"{getattr(config, 'model_type', 'model')}: {parameters:,} parameters, {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size:,}, vocabulary {config.vocab_size:,}; {recipe[recipe_of(cfg)]}, "
          f"optim {cfg.OPTIM}")
    print(f"longest micro-batch the data can give: {train:,} tokens ({cfg.BATCH_SIZE} longest examples, "
          f"{'packed' if cfg.PACKING else 'padded'}); longest eval micro-batch: {evaluation:,} trained positions")
    gb = lambda n: f"{n / GB:6.2f} GB"  # noqa: E731
    parts, other = result.parts, result.alternatives
    checkpointing = "on" if cfg.GRADIENT_CHECKPOINTING else "off"
    liger = "Liger fused loss" if cfg.USE_LIGER_KERNEL else "full logits, --use_liger_kernel=False"
    lines = [
        ("weights (frozen)" if recipe_of(cfg) != "full" else "weights (frozen buffers)", parts["weights"], ""),
        ("adapter and trainable rows" if recipe_of(cfg) != "full" else "trained weights", parts["trainable"],
         f"{rows:,} embedding rows" if rows else ""),
        ("optimizer states", parts["optimizer"],
         "32-bit states for the embedding: bitsandbytes" if "8bit" in cfg.OPTIM and cfg.OPTIM != "adamw_torch_8bit"
         and getattr(cfg, "EMBEDDING_MODE", None) == "full" and cfg.MODULES_TO_SAVE else ""),
        ("gradients", parts["gradients"], ""),
        (f"activations (checkpointing {checkpointing})", parts["activations"],
         f"{'off' if cfg.GRADIENT_CHECKPOINTING else 'on'}: {other['activations'] / GB:.2f} GB"),
        (f"logits ({liger})", parts["logits"],
         f"{'without' if cfg.USE_LIGER_KERNEL else 'with'} Liger: {other['logits'] / GB:.2f} GB"),
    ]
    if "merged rows" in parts:
        lines.append(("merged embedding copies (tokens mode)", parts["merged rows"], f"{TOKENS_MODE_COPIES} x vocab x hidden"))
    if "liger lm_head grad" in parts:
        lines.append(("Liger's lm_head gradient", parts["liger lm_head grad"], "vocab x hidden"))
    lines += [("CUDA context", parts["cuda context"], "outside torch's count"),
              ("training step peak", result.train_peak, ""),
              ("evaluation peak", result.eval_peak, "no gradients; logits of the trained positions")]
    for name, value, note in lines:
        print(f"  {name:<48} {gb(value)}" + (f"   ({note})" if note else ""))
    for note in result.notes:
        print(f"  note: {note}")
    verdict = "fits" if result.peak <= budget * GB else "does NOT fit"
    print(f"estimated peak {result.peak / GB:.2f} GB of {budget:.1f} GB (gpu_memory_gb): {verdict}. Weights, "
          "optimizer states and gradients are counted exactly; activations and logits are a formula, not measured")
    if result.peak > budget * GB:
        chosen, settings = [], cfg
        for flag, change in fixes(cfg):
            settings = _with(settings, **change)
            chosen.append(flag)
            after, _, _ = estimate(settings)
            if after.peak <= budget * GB:
                print(f"to fit, change first: {chosen[0]}"
                      + (f"; then {', '.join(chosen[1:])}" if len(chosen) > 1 else "")
                      + f" (estimated {after.peak / GB:.2f} GB)")
                break
        else:
            advice = ("use train_lora.py (QLoRA), or a smaller model" if recipe_of(cfg) == "full"
                      else "lower --max_length, or use a smaller model")
            print(f"even with {', '.join(chosen) or 'the current settings'} it does not fit: {advice}")
    print("====", flush=True)
    return result

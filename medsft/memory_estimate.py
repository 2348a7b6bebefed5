"""Will it fit? Peak GPU memory of a training run, estimated before any weight is downloaded or loaded.

The model is built on PyTorch's meta device from its config.json alone (shapes, no data), and every tensor the
run will hold is counted in the dtype it will have there: the frozen weights (4-bit NF4 with its quantisation
state, or bf16), the trainable weights (LoRA, embedding rows, or all of them for train.py), the optimizer's
states (bitsandbytes keeps 32-bit states for small tensors and for every nn.Embedding, 8-bit for the rest;
torchao likewise), and the gradients. Those static parts are checked against the bytes of real tensors on CPU
(tests/test_memory_estimate.py). Activations and logits are formulas of the micro-batch's tokens, each checked
against the memory really allocated on CPU, one loss or one layer at a time at Qwen3-1.7B's shapes
(tests/test_memory_measured.py); not yet on a GPU. Two totals: the torch-visible peak (what torch's allocator
holds) and the device total (plus a paged optimizer's states in CUDA managed memory, and the CUDA context).
"""
import functools
import json
import math
from dataclasses import dataclass, field
from medsft import losses

GB = 1e9
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CUDA_CONTEXT_BYTES = int(0.5 * GB)  # CUDA context and allocator slack: outside torch's count, typically 0.3-0.6 GB
TOKENS_MODE_COPIES = 2  # "tokens", measured: the merged weight lm_head keeps for its backward, and its gradient
BNB_MIN_8BIT_SIZE, OPTIMIZER_BLOCK = 4096, 256  # bitsandbytes and torchao: smaller tensors keep 32-bit states
PAGED_MIN_SIZE = 100_000  # bitsandbytes' paged optimizers page every state tensor of at least this many elements


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
    train_peak: int = 0  # device total of the training step: every part, paged states and CUDA context included
    eval_peak: int = 0
    eval_transient: int = 0
    paged: int = 0  # of parts["optimizer"]: the states a paged optimizer keeps in CUDA managed memory
    outside_torch: int = 0  # the paged states and the CUDA context: what torch's memory counters never see
    typical: dict = field(default_factory=dict)  # the dry run's: "p50"/"p90" -> {tokens, torch_peak, device_total}

    @property
    def peak(self) -> int:
        """The device total: what the whole GPU holds at the peak (torch-visible + paged states + CUDA context)."""
        return max(self.train_peak, self.eval_peak)

    @property
    def device_total(self) -> int:
        return self.peak

    @property
    def torch_peak(self) -> int:
        """The torch-visible peak: the figure to hold against torch.cuda.max_memory_reserved()."""
        return self.peak - self.outside_torch


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


def paged_state_bytes(optim: str, numel: int, embedding: bool) -> int:
    """The part of one parameter's optimizer state that a paged bitsandbytes optimizer puts in CUDA managed memory
    (get_state_buffer: every state tensor of at least 1e5 elements; the 8-bit absmax stay ordinary tensors).
    torch's memory counters never see it; under memory pressure the driver moves it to host memory."""
    if "paged" not in optim or numel < PAGED_MIN_SIZE:
        return 0
    states = 1 if "lion" in optim else 3 if "ademamix" in optim else 2
    eight_bit = _bnb_8bit(optim) and not embedding and numel >= BNB_MIN_8BIT_SIZE
    return states * numel * (1 if eight_bit else 4)


def static_parts(config, cfg, layout: Layout, trained_rows: int | None = None) -> dict:
    """{weights, trainable, optimizer, gradients} in bytes, from the meta model and the settings."""
    return _static(config, cfg, layout, trained_rows)[0]


def paged_optimizer_bytes(config, cfg, layout: Layout, trained_rows: int | None = None) -> int:
    """Of static_parts' optimizer states, the bytes a paged optimizer keeps in CUDA managed memory (torch's counters
    never see them); 0 off CUDA or for an unpaged optimizer."""
    return _static(config, cfg, layout, trained_rows)[1]


def _static(config, cfg, layout: Layout, trained_rows: int | None = None) -> tuple[dict, int]:
    """(static_parts, bytes of the optimizer states a paged optimizer keeps in managed memory, on CUDA)."""
    params, buffers = tensor_table(config)
    hidden, vocab = config.hidden_size, config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding_modules = {"embed_tokens"} | (set() if tied else {"lm_head"})
    weights = trainable = optimizer = gradients = paged = 0
    states_32bit_shared = 0
    optim = cfg.OPTIM

    def add_trainable(numel, nbytes, embedding=False):
        nonlocal trainable, optimizer, gradients, paged
        trainable += numel * nbytes
        gradients += numel * nbytes
        optimizer += optimizer_state_bytes(optim, numel, nbytes, embedding)
        if layout.device == "cuda":  # on CPU bitsandbytes runs a paged optimizer unpaged
            paged += paged_state_bytes(optim, numel, embedding)

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
            "gradients": gradients}, paged


def layer_activation_bytes(config, cfg, layout: Layout) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token, besides its input: what autograd saves in
    PyTorch's own kernels (transformers' Qwen3 layer, PEFT's LoRA, bitsandbytes' Linear4bit, under autocast on CUDA).

    Measured on CPU at Qwen3-1.7B's layer shapes (tests/test_memory_measured.py). What decides the bytes:
    - QLoRA's residual stream is fp32 (the widened norms and embedding output), and Linear4bit returns its input's
      dtype, so q/k and gate/up come out fp32 and are kept in fp32. v1's layer (r=64, dropout 0.05) keeps 171 KB a
      token with its input, measured, plus 5.0 MB of autocast's bf16 LoRA weight copies. We count that as it runs:
      casting those outputs to bf16 would save about 43 KB a token (25%), but changes the numbers the model
      computes, and its effect on the loss has not been measured;
    - a frozen RMSNorm keeps only its fp32 input (the residual, for QLoRA) and one rsqrt a row;
    - a frozen base weight keeps nothing of its input (bitsandbytes' 4-bit matmul, or a linear whose weight has no
      gradient); the LoRA branch keeps its own: the dropout mask (1 byte on CUDA) and the dropout output, or, without
      dropout, the input in the compute dtype (each target its own cast when the input is fp32);
    - attention keeps q, k, v and its output in the compute dtype, and an fp32 log-sum-exp a head.
    Liger's RMSNorm/RoPE/SwiGLU kernels keep somewhat less; they are not counted separately (the estimate errs high).
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    a, rs = layout.compute_bytes, layout.residual_bytes
    q, kv = heads * head_dim, kv_heads * head_dim
    full = layout.recipe == "full"
    normed = rs  # a norm's output: the residual's dtype (QLoRA's norm weights are fp32, else the compute dtype)
    # a projection's output: Linear4bit returns its input's dtype; a bf16 linear under autocast, the compute dtype
    out = normed if layout.recipe == "qlora" else a
    norm_copy = 0 if normed == 4 else 4  # RMSNorm works in fp32: a bf16 input is copied to fp32 and kept
    per_token = (rs * hidden  # the residual after attention: the MLP norm's input
                 + 4 * (2 + heads + kv_heads)  # each RMSNorm's rsqrt (input, post-attention, q and k norms)
                 + 2 * norm_copy * hidden + norm_copy * (q + kv)
                 + out * (q + kv)  # q and k, kept by their norms
                 + a * (q + 2 * kv) + a * q + 4 * heads  # attention's inputs, output and log-sum-exp
                 + 3 * out * inter)  # gate, silu(gate), up
    if full:  # trained weights: every linear keeps its input, every norm its normalised output
        # (o_proj's input is attention's output itself, whose layout makes the transpose free: counted above)
        per_token += 2 * normed * hidden + out * inter + 2 * a * hidden + a * (q + kv)
        return per_token
    inputs = {"q_proj": ("attn", hidden, normed), "k_proj": ("attn", hidden, normed),
              "v_proj": ("attn", hidden, normed), "o_proj": ("o", q, a), "gate_proj": ("mlp", hidden, normed),
              "up_proj": ("mlp", hidden, normed), "down_proj": ("down", inter, out)}
    kept_once = set()
    for target in cfg.TARGET_MODULES:
        if target not in inputs:
            continue
        group, width, dtype = inputs[target]
        if cfg.LORA_DROPOUT > 0:  # the mask (bool on CUDA; the input's dtype on CPU) and the dropout output
            per_token += ((1 if layout.device == "cuda" else dtype) + (a if layout.device == "cuda" else dtype)) * width
        elif dtype != a:  # autocast casts the fp32 input for lora_A, once per target
            per_token += a * width
        elif group not in kept_once:  # lora_A keeps the input itself, shared by the targets that read it
            kept_once.add(group)  # (o_proj's is attention's output, counted above)
            per_token += a * width if group != "o" else 0
        per_token += a * cfg.LORA_R  # lora_A's output, kept by lora_B
    return per_token


def lora_weight_casts(cfg, layout: Layout, params: list) -> int:
    """Autocast's bf16 copies of one layer's fp32 LoRA weights, kept by their matmuls until the backward."""
    if layout.device != "cuda" or not hasattr(cfg, "LORA_R"):
        return 0
    per_layer = sum(cfg.LORA_R * sum(shape) for name, _, shape, linear in params
                    if linear and ".layers.0." in f".{name}." and name.rsplit(".", 2)[-2] in cfg.TARGET_MODULES)
    return layout.compute_bytes * per_layer


def activation_bytes(config, cfg, layout: Layout, tokens: int, checkpointing: bool) -> int:
    """Activations kept for the backward pass: every layer's (layer_activation_bytes), or with checkpointing each
    layer's input plus one layer recomputed at a time; and the final norm's and the lm_head's inputs."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    a, rs = layout.compute_bytes, layout.residual_bytes
    params = tensor_table(config)[0]
    casts = lora_weight_casts(cfg, layout, params)
    one_layer = tokens * (rs * hidden + layer_activation_bytes(config, cfg, layout)) + casts
    head = tokens * hidden * (4 + a)  # the final norm and the lm_head input
    # bitsandbytes dequantizes each 4-bit weight whole, in the compute dtype, for its matmul (forward and backward)
    dequantized = a * max(numel for _, numel, _, linear in params if linear) if layout.recipe == "qlora" else 0
    if checkpointing:
        return layers * tokens * hidden * rs + one_layer + head + dequantized
    return layers * one_layer + head + dequantized


def logit_bytes(config, layout: Layout, tokens: int, liger: bool) -> int:
    """The loss's logits. Without Liger, transformers' loss takes an fp32 copy of the [tokens, vocab] logits; its
    backward then holds three fp32 [tokens, vocab] tensors at once: the saved log-softmax, the NLL gradient and the
    log-softmax's gradient (measured: tests/test_memory_measured.py; the bf16 logits are gone by then). With Liger's
    fused linear cross-entropy, one chunk of rows at a time, and the input's gradient."""
    vocab, hidden, a = config.vocab_size, config.hidden_size, layout.compute_bytes
    if not liger:
        return tokens * vocab * 3 * 4
    chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(vocab / hidden)))))
    return chunk * vocab * (a + 4) + tokens * hidden * a


def eval_logit_bytes(config, layout: Layout, positions: int) -> int:
    """Evaluation's logits (medsft/losses.py): those of the trained positions in the compute dtype, then
    EVAL_LOSS_CHUNK of them at a time as an fp32 copy and its log-softmax (measured as the loss above)."""
    vocab, a = config.vocab_size, layout.compute_bytes
    chunk = min(positions, losses.EVAL_LOSS_CHUNK)
    return positions * vocab * a + chunk * vocab * max(a + 4, 4 + 4)


def lm_head_trained(cfg, layout: Layout) -> bool:
    return layout.recipe == "full" or bool({"embed_tokens", "lm_head"} & set(getattr(cfg, "MODULES_TO_SAVE", [])))


def estimate_memory(config, cfg, device: str = "cuda", train_tokens: int = 0, eval_tokens: int = 0,
                    trained_rows: int | None = None) -> Estimate:
    """The estimate for one GPU (each DDP process holds the same): static parts, then the larger of the
    training step's and the evaluation's transient memory."""
    layout = Layout(device, recipe_of(cfg), 4 if getattr(cfg, "FP32_WEIGHTS", False) else 2)
    static, paged = _static(config, cfg, layout, trained_rows)
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
                     f"access; counted {TOKENS_MODE_COPIES} copies at once, as measured on CPU (the one lm_head "
                     "keeps for its backward, and its gradient)")
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
    eval_transient = eval_logit_bytes(config, layout, eval_tokens) \
        + (vocab * hidden * layout.embedding_bytes if trained_rows else 0)
    common = static["weights"] + static["trainable"] + static["optimizer"] + parts.get("cuda context", 0)
    return Estimate(parts, alternatives, notes, train_peak=sum(parts.values()), eval_peak=common + eval_transient,
                    eval_transient=eval_transient, paged=paged, outside_torch=paged + parts.get("cuda context", 0))


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


def print_memory_estimate(model_path: str, cfg, data):
    """The dry run's report: medsft/memory_report.py."""
    from medsft.memory_report import print_memory_estimate as report

    return report(model_path, cfg, data)

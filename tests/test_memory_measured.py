"""The estimate's transient parts against memory really allocated, on CPU, one loss or one layer at a time, at
Qwen3-1.7B's shapes (151,936-token vocabulary; a 2,048-wide layer with 16 heads of 128, 8 KV heads, MLP 6,144).

How it measures (`LiveBytes`): a TorchDispatchMode sees every tensor each aten operation returns, forward and
backward (on CPU autograd runs the backward on the calling thread, inside the mode). A result whose storage is
new (none of the operation's inputs has it) is counted with its storage's bytes until Python frees that storage
(a weakref callback); the peak is the largest sum reached. That is what a caching allocator must hold at least
(CUDA's rounds each block up to 512 bytes), without the cache's slack. Tensors made before the mode started
(weights, the layer's input) are not counted, so each figure is what the step adds.

CUDA is emulated where CPU runs differently, each named where it is done: bf16 autocast (torch.autocast("cpu")),
PEFT's question whether autocast is on (it asks about CUDA's), and dropout's fused kernel (CUDA keeps a bool
mask, CPU's dropout a mask in the input's dtype).
"""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import train_lora
from medsft.memory_estimate import (Layout, activation_bytes, eval_logit_bytes, layer_activation_bytes,
                                    logit_bytes, lora_weight_casts, tensor_table)
from medsft.settings import parse_settings
from tests.test_memory_estimate import QWEN3_1_7B

VOCAB, HIDDEN = QWEN3_1_7B["vocab_size"], QWEN3_1_7B["hidden_size"]


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that operations allocate while the mode is on: `now`, and the `peak`."""

    def __init__(self):
        super().__init__()
        self.sizes, self.refs, self.now, self.peak = {}, {}, 0, 0

    def _freed(self, key):
        self.now -= self.sizes.pop(key)
        self.refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.sizes:  # a view, an in-place result, or one already counted
                continue
            self.sizes[key] = storage.nbytes()
            self.refs[key] = weakref.ref(storage, lambda _, k=key: self._freed(k))
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        return out


def qwen3_config(**changes):
    from transformers import Qwen3Config

    return Qwen3Config(**{**{k: v for k, v in QWEN3_1_7B.items() if k not in ("architectures", "model_type")},
                          **changes})


def test_the_no_liger_loss_holds_three_fp32_logit_tensors_at_real_vocabulary():
    """transformers' own causal-LM loss on bf16 logits, as a CUDA step without Liger runs it: forward and backward.
    The backward holds the saved log-softmax, the NLL gradient and its result, each [tokens, vocab] in fp32."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    tokens = 256
    labels = torch.randint(0, VOCAB, (1, tokens))
    with LiveBytes() as tracker:
        logits = torch.randn(1, tokens, VOCAB, dtype=torch.bfloat16).requires_grad_()  # the lm_head's output
        base = tracker.now
        loss = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=torch.tensor(tokens))
        del logits  # the Trainer drops the model's outputs before the backward: only what autograd saved is left
        loss.backward()
    measured = tracker.peak - base
    estimated = logit_bytes(qwen3_config(), Layout("cuda", "qlora"), tokens, liger=False)
    print(f"no-Liger loss at {tokens} x {VOCAB:,}: measured {measured / tokens / VOCAB:.2f} bytes a logit, "
          f"estimated {estimated / tokens / VOCAB:.2f}")
    assert estimated == pytest.approx(measured, rel=0.05)
    assert measured > 11.5 * tokens * VOCAB  # three fp32 copies, not two


def test_the_eval_loss_holds_the_bf16_logits_and_one_fp32_chunk(monkeypatch):
    """medsft/losses.py token_losses: the bf16 logits of the trained positions, then EVAL_LOSS_CHUNK of them at a
    time in fp32 (a smaller chunk here, so that three chunks run quickly)."""
    from types import SimpleNamespace

    from medsft import losses

    chunk, positions = 96, 250
    monkeypatch.setattr(losses, "EVAL_LOSS_CHUNK", chunk)

    class LogitsOnly(torch.nn.Module):  # the model's forward, reduced to the bf16 logits of the kept positions
        def forward(self, logits_to_keep, **_):
            return SimpleNamespace(logits=torch.randn(1, len(logits_to_keep), VOCAB, dtype=torch.bfloat16))

    labels = torch.full((1, positions + 1), -100)
    labels[0, 1:] = torch.randint(0, VOCAB, (positions,))
    batch = {"input_ids": torch.zeros(1, positions + 1, dtype=torch.long), "labels": labels}
    with torch.no_grad(), LiveBytes() as tracker:
        losses.token_losses(LogitsOnly(), batch)
    estimated = eval_logit_bytes(qwen3_config(), Layout("cuda", "qlora"), positions)
    print(f"eval loss, {positions} positions in chunks of {chunk}: measured {tracker.peak / 1e6:.0f} MB, "
          f"estimated {estimated / 1e6:.0f} MB")
    assert estimated == pytest.approx(tracker.peak, rel=0.05)


@pytest.fixture(scope="module")
def qlora_layer(tmp_path_factory):
    """One Qwen3-1.7B decoder layer (vocabulary cut to 1,024: the embedding plays no part here) loaded in NF4 the
    way training loads it, with v1's LoRA (r=64 on all seven projections)."""
    from peft import get_peft_model

    from medsft.model_loading import load_base_model
    from medsft.training import build_lora_config

    from transformers import Qwen3ForCausalLM

    folder = tmp_path_factory.mktemp("qwen3-1.7b-one-layer")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(qwen3_config(num_hidden_layers=1, vocab_size=1024))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.save_pretrained(folder)
    model = load_base_model(str(folder), load_in_4bit=True)
    cfg = parse_settings(vars(train_lora), ["--lora_dropout=0.05"])
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, build_lora_config(cfg, tied=True, token_indices=None))
    model.train()
    return model, cfg


def cuda_like(monkeypatch):
    """bf16 autocast, PEFT told that it is on (it asks `torch.is_autocast_enabled()`, which means CUDA's), and
    dropout as CUDA's fused kernel runs it (aten.native_dropout: a bool mask)."""
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *device: torch.is_autocast_cpu_enabled())
    monkeypatch.setattr(torch.nn.functional, "dropout",
                        lambda x, p=0.5, training=True, inplace=False:
                        torch.ops.aten.native_dropout(x, p, training)[0] if training and 0 < p < 1 else x)
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_qlora_layer_at_1_7b_shapes_keeps_what_the_estimate_counts(qlora_layer, checkpointing, monkeypatch):
    """Forward then backward of one NF4 layer with r=64 LoRA on a fp32 residual stream. Without checkpointing the
    layer keeps its activations until the backward; with it, only its input, and the backward recomputes them."""
    from torch.utils.checkpoint import checkpoint

    model, cfg = qlora_layer
    inner = model.base_model.model.model
    layer, tokens = inner.layers[0], 64
    config, layout = qwen3_config(), Layout("cuda", "qlora")
    residual = torch.randn(1, tokens, HIDDEN, requires_grad=True)  # fp32: QLoRA's widened embedding output
    position_ids = torch.arange(tokens)[None]
    rope = inner.rotary_emb(residual, position_ids)

    def run(x):
        return layer(x, position_embeddings=rope, position_ids=position_ids)

    with LiveBytes() as tracker:
        with cuda_like(monkeypatch):  # as the Trainer runs it: autocast around the forward only
            out = checkpoint(run, residual, use_reentrant=False) if checkpointing else run(residual)
        kept = tracker.now  # after the forward: the saved activations and the output (the next layer's input)
        out.backward(torch.ones_like(out))
    assert out.dtype == torch.float32  # Linear4bit hands back its input's dtype: the residual stays fp32
    casts = lora_weight_casts(cfg, layout, tensor_table(config)[0])
    one_layer = tokens * (layout.residual_bytes * HIDDEN + layer_activation_bytes(config, cfg, layout)) + casts
    if checkpointing:  # the output only; the peak is the recomputed layer, during its backward
        assert kept == tokens * HIDDEN * 4
        # the estimate over 28 layers: each input, one layer recomputed (and the head), all measured here but the head
        # (and one 4-bit weight dequantized for its matmul: 25 MB for gate, up or down at 1.7B)
        estimated = activation_bytes(config, cfg, layout, tokens, True) - 27 * tokens * HIDDEN * 4 \
            - tokens * HIDDEN * (4 + 2)
        measured = tracker.peak
    else:
        estimated, measured = one_layer, kept
    print(f"one QLoRA layer, {tokens} tokens, checkpointing {checkpointing}: measured {measured / tokens / 1e3:.1f} "
          f"KB a token, estimated {estimated / tokens / 1e3:.1f} KB")
    assert estimated == pytest.approx(measured, rel=0.05)


def test_tokens_mode_holds_two_merged_vocabulary_copies(tiny_model_dir, short_data_dir, tokenizer):
    """EMBEDDING_MODE="tokens" on the tied tiny model (the real 151,936-row vocabulary, hidden 64): PEFT merges the
    trained rows into a full [vocab, hidden] weight on each access. Counted: how many storages of exactly that size
    live at once during a forward and backward without Liger (the merged weight lm_head keeps for its backward,
    then its gradient). Liger's fused loss (CUDA only, not run here) adds its own lm_head gradient, counted apart."""
    import train_lora2
    from medsft.memory_estimate import TOKENS_MODE_COPIES
    from medsft.training import load_lora_model
    from medsft.training_data import load_training_data

    cfg = parse_settings(vars(train_lora2), [f"--model_path={tiny_model_dir}", f"--data_dir={short_data_dir}"])
    model = load_lora_model(str(tiny_model_dir), cfg, load_training_data(cfg, tokenizer))
    model.train()
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    copy = vocab * hidden * 4  # fp32 on CPU
    ids = torch.tensor([tokenizer("头痛三天，伴有发热，怎么办？")["input_ids"]])

    class Copies(LiveBytes):
        def __init__(self):
            super().__init__()
            self.copies = self.most = 0

        def _freed(self, key):
            self.copies -= self.sizes.get(key) == copy
            super()._freed(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = set(self.sizes)
            out = super().__torch_dispatch__(func, types, args, kwargs)
            self.copies += sum(self.sizes[k] == copy for k in set(self.sizes) - before)
            self.most = max(self.most, self.copies)
            return out

    with Copies() as tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    print(f"tokens mode: at most {tracker.most} [{vocab:,} x {hidden}] copies at once; peak {tracker.peak / copy:.2f} "
          "copies' bytes (with the logits of a few tokens)")
    assert tracker.most == TOKENS_MODE_COPIES


@pytest.mark.parametrize("recipe, dropout", [("bf16_lora", 0.05), ("bf16_lora", 0.0), ("full", 0.0)])
def test_one_layer_of_the_other_recipes_keeps_what_the_estimate_counts_on_cpu(recipe, dropout):
    """bf16 LoRA and train.py's layer as they run on CPU (fp32, no autocast: the estimator's "cpu" layout), at a
    small width (the shapes' roles are what these check; the QLoRA test above has the real ones)."""
    import train
    from peft import get_peft_model
    from transformers import Qwen3ForCausalLM

    from medsft.training import build_lora_config

    config = qwen3_config(hidden_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64, intermediate_size=768, vocab_size=512)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    if recipe == "full":
        cfg = parse_settings(vars(train), [])
    else:
        cfg = parse_settings(vars(train_lora), ["--load_in_4bit=False", f"--lora_dropout={dropout}"])
        model.requires_grad_(False)
        model = get_peft_model(model, build_lora_config(cfg, tied=True, token_indices=None))
    model.train()
    inner = model.model if recipe == "full" else model.base_model.model.model
    tokens = 64
    residual = torch.randn(1, tokens, 256, requires_grad=True)
    position_ids = torch.arange(tokens)[None]
    with LiveBytes() as tracker:
        out = inner.layers[0](residual, position_embeddings=inner.rotary_emb(residual, position_ids),
                              position_ids=position_ids)
        kept = tracker.now  # the saved activations and the output, which the graph keeps until the backward
    assert out.requires_grad
    estimated = tokens * (4 * 256 + layer_activation_bytes(config, cfg, Layout("cpu", recipe)))
    assert estimated == pytest.approx(kept, rel=0.05), (estimated / tokens, kept / tokens)

"""Next-token loss on the trained positions only, without materialising the full-vocabulary logits.

Qwen3's vocabulary has 151,936 entries: a micro-batch of 4 x 1,000 tokens has 2.4 GB of fp32 logits.
We run the decoder, keep the hidden states of the positions whose next token is trained, and push them
through lm_head in chunks; each chunk's logits are recomputed in the backward pass instead of kept.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from medsft.chat_format import IGNORE_INDEX


def _unwrap_causal_lm(model):
    """The Qwen3ForCausalLM inside a PeftModel (LoRA layers stay in place, so they still apply)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner


def mixed_precision(device: torch.device):
    """Autocast to the compute dtype on CUDA. The loss calls the decoder and lm_head directly, bypassing the
    model's top-level forward where accelerate applies autocast; without this the fp32 norms and embedding
    (from prepare_model_for_kbit_training) would keep every activation, and lm_head, in fp32."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from medsft.model_loading import compute_dtype

    return torch.autocast("cuda", dtype=compute_dtype())


def _chunk_loss(lm_head, hidden, targets):
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def token_losses(model, batch: dict, chunk_size: int = 0):
    """(per-token losses, segments) over the positions whose next token is trained.

    chunk_size 0 computes the selected positions' logits at once; > 0 does it chunk_size tokens at a time;
    < 0 computes the logits of every position, as the originals did (kept for benchmarking them).
    """
    with mixed_precision(batch["input_ids"].device):
        return _token_losses(_unwrap_causal_lm(model), batch, chunk_size)


def _token_losses(causal_lm, batch: dict, chunk_size: int):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    hidden = causal_lm.model(**inputs, use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    if chunk_size < 0:
        logits = causal_lm.lm_head(hidden).float()[:, :-1]
        segments = batch["segments"][:, 1:][keep] if "segments" in batch else None
        return F.cross_entropy(logits[keep], labels[keep], reduction="none"), segments
    hidden, targets = hidden[:, :-1][keep], labels[keep]
    segments = batch["segments"][:, 1:][keep] if "segments" in batch else None
    lm_head = causal_lm.lm_head
    if chunk_size <= 0 or hidden.shape[0] <= chunk_size:
        return _chunk_loss(lm_head, hidden, targets), segments
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_loss, lm_head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_loss(lm_head, h, t))
    return torch.cat(pieces), segments

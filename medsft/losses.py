"""Per-token losses of the trained positions, through the model's own forward (so DDP, DeepSpeed and FSDP see it).

Training uses the Trainer's loss (the forward with labels and num_items_in_batch); on CUDA with liger-kernel
that forward is Liger's fused linear cross-entropy and full-vocabulary logits never exist. Evaluation needs
each token's loss (to split think from answer), so it asks the forward for the logits of the trained
positions only (`logits_to_keep`): Qwen3's 151,936-wide logits of the prompt tokens are never made. Their
fp32 cross-entropy then runs EVAL_LOSS_CHUNK positions at a time, so no fp32 copy of the whole micro-batch's
logits exists (4 x 1,443 positions would take 3.5 GB each for the copy and its log-softmax).
"""
import contextlib

import torch
import torch.nn.functional as F

from medsft.chat_format import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # a collated batch's keys that the forward takes
EVAL_LOSS_CHUNK = 1024  # positions whose fp32 logits and log-softmax exist at once (0.6 GB each for Qwen3)


def mixed_precision(device: torch.device):
    """Autocast to the compute dtype on CUDA, as the Trainer's accelerate wrapper does during training: the
    fp32 norms and embedding left by prepare_model_for_kbit_training would otherwise keep activations in fp32."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from medsft.model_loading import compute_dtype

    return torch.autocast("cuda", dtype=compute_dtype())


def token_losses(model, batch: dict):
    """(per-token losses in fp32, segments or None) over the positions whose next token is trained."""
    labels = batch["labels"]
    trained = labels[:, 1:] != IGNORE_INDEX  # position p predicts labels[p + 1]
    positions = trained.any(dim=0).nonzero().squeeze(1)  # shared by all rows: 1-D logits_to_keep works everywhere
    with mixed_precision(labels.device):
        logits = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, use_cache=False,
                       logits_to_keep=positions).logits
    targets, keep = labels[:, positions + 1], trained[:, positions]
    rows, columns = keep.nonzero(as_tuple=True)
    losses = torch.cat([F.cross_entropy(logits[rows[i:i + EVAL_LOSS_CHUNK], columns[i:i + EVAL_LOSS_CHUNK]].float(),
                                        targets[rows[i:i + EVAL_LOSS_CHUNK], columns[i:i + EVAL_LOSS_CHUNK]],
                                        reduction="none")
                        for i in range(0, len(rows), EVAL_LOSS_CHUNK)] or [logits.new_zeros(0, dtype=torch.float32)])
    segments = batch["segments"][:, positions + 1][keep] if "segments" in batch else None
    return losses, segments

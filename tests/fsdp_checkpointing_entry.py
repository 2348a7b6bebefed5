"""One rank of a 2-process FSDP2 launch on CPU that builds the v2 trainer (EMBEDDING_MODE="tokens": the FSDP2 units
are made by medsft/distributed.py, shard_tied_token_rows), trains one step, and writes how often each decoder
layer's first norm ran in it: twice (the forward, then its recomputation in the backward) when activation
checkpointing is on, once when it is off."""
import json
import os
import sys

sys.path.insert(0, os.getcwd())
os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")

from fsdp_on_cpu import enable_fsdp_on_cpu  # noqa: E402  (beside this file: Python puts tests/ on the path)

enable_fsdp_on_cpu()

import train_lora2  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from medsft.model_loading import load_tokenizer  # noqa: E402
from medsft.settings import parse_settings  # noqa: E402
from medsft.training import build_trainer, load_lora_model  # noqa: E402
from medsft.training_data import load_training_data  # noqa: E402

cfg = parse_settings(vars(train_lora2), sys.argv[1:])
tokenizer = load_tokenizer(cfg.MODEL_PATH)
data = load_training_data(cfg, tokenizer)
model = load_lora_model(cfg.MODEL_PATH, cfg, data)
calls = {}
for index, layer in enumerate(model.base_model.model.model.layers):
    # the layer's first module: a recomputation runs it (torch stops recomputing once the last saved tensor it
    # needs is back, so a later module's hook may never fire; the layer's own is outside the checkpoint)
    layer.input_layernorm.register_forward_hook(
        lambda module, args, out, i=index: calls.__setitem__(i, calls.get(i, 0) + 1))
trainer = build_trainer(cfg, model, tokenizer, data)
step_calls = {}


class CountInStep(TrainerCallback):
    """The forwards of the training step only (the evaluation after it runs each layer once more)."""

    def on_step_begin(self, args, state, control, **kwargs):
        calls.clear()

    def on_step_end(self, args, state, control, **kwargs):
        step_calls.update(calls)


trainer.add_callback(CountInStep())
trainer.train()
facts = {"fsdp": trainer.is_fsdp_enabled, "steps": trainer.state.global_step, "layer_forwards": step_calls,
         "checkpointed_layers": sum(bool(getattr(layer, "gradient_checkpointing", False))
                                    for layer in model.base_model.model.model.layers),
         "saved": sorted(p.name for p in trainer.best_dir.iterdir()) if trainer.best_dir.exists() else []}
with open(os.path.join(os.environ["RANK_WEIGHTS_DIR"], f"rank{trainer.args.process_index}.json"), "w") as f:
    json.dump(facts, f)

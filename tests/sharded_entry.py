"""One rank of a multi-process launch on CPU (sharded, or plain DDP under torchrun): the CPU-only enabling the
product does not need on GPUs, then the script's main(), then what the test checks (the rank's trainable weights,
gathered whole, and the sharding)."""
import importlib
import json
import os
import sys

sys.path.insert(0, os.getcwd())

from fsdp_on_cpu import enable_fsdp_on_cpu  # noqa: E402  (beside this file: Python puts tests/ on the path)

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    enable_fsdp_on_cpu()

import torch  # noqa: E402


def whole_trainable_weights(trainer) -> dict:
    """This rank's trainable weights, gathered whole (ZeRO-3 partitions them, FSDP2 holds DTensor shards)."""
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    if trainer.is_deepspeed_enabled and any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in params}


# argv: script, then its settings; RESUME_AT=N first trains to step N, then the same command continues the run
# (the first run's summary is kept as first_summary.json beside the ranks' files, and a ruler marks where the
# second run's output starts)
script, settings = sys.argv[1], sys.argv[2:]
main = importlib.import_module(script).main
out = os.environ["RANK_WEIGHTS_DIR"]
if os.environ.get("RESUME_AT"):
    first = main(settings + [f"--max_steps={os.environ['RESUME_AT']}"])
    if first["trainer"].args.process_index == 0:
        with open(os.path.join(out, "first_summary.json"), "w") as f:
            json.dump(first["summary"], f)
        print("==== the same command again ====", flush=True)
result = main(settings)
trainer = result["trainer"]
if trainer.is_fsdp_enabled:  # FSDP2 leaves the units it does not reshard after forward (the tail) gathered
    from torch.distributed.fsdp import FSDPModule

    for module in trainer.model_wrapped.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
weights = whole_trainable_weights(trainer)
rank = trainer.args.process_index
facts = {"deepspeed": trainer.is_deepspeed_enabled, "fsdp": trainer.is_fsdp_enabled,
         "fsdp_version": getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", None)
         if trainer.is_fsdp_enabled else None,
         "world_size": trainer.args.world_size, "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
         if trainer.is_deepspeed_enabled else None,
         "partitioned": sum(hasattr(p, "ds_id") or hasattr(p, "full_tensor") for p in trainer.model.parameters()),
         "parameters": sum(1 for _ in trainer.model.parameters())}
torch.save(weights, os.path.join(out, f"rank{rank}.pt"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(facts, f)

"""One rank of a sharded launch on CPU: the CPU-only enabling the product does not need on GPUs, then the
script's main(), then what the test checks (the rank's trainable weights, gathered whole, and the sharding)."""
import importlib
import json
import os
import sys

sys.path.insert(0, os.getcwd())


def enable_fsdp_on_cpu():
    """accelerate 1.15 (accelerate/state.py, AcceleratorState.__init__: `elif self.distributed_type in
    [DistributedType.MULTI_GPU, ...]`) turns FSDP on only for GPU setups; a CPU process group over gloo is
    DistributedType.NO there, and the Trainer would run without FSDP. Present it as a GPU one while
    AcceleratorState decides (it then becomes DistributedType.FSDP)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        state = PartialState(**{k: v for k, v in kwargs.items() if k in ("cpu", "backend")})
        if state.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU) and state.num_processes > 1:
            state.distributed_type = DistributedType.MULTI_GPU
        original(self, *args, **kwargs)

    AcceleratorState.__init__ = init


if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    enable_fsdp_on_cpu()

import torch  # noqa: E402

result = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
trainer = result["trainer"]
model = trainer.model_wrapped
params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
facts = {"deepspeed": trainer.is_deepspeed_enabled, "fsdp": trainer.is_fsdp_enabled,
         "world_size": trainer.args.world_size,
         "zero3_partitioned": sum(hasattr(p, "ds_id") for p in trainer.model.parameters()),
         "parameters": sum(1 for _ in trainer.model.parameters())}
print("SHARDING", json.dumps(facts), flush=True)

"""For the multi-process entries (tests/sharded_entry.py, tests/fsdp_checkpointing_entry.py): FSDP on CPU, which
the product does not need on GPUs."""


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

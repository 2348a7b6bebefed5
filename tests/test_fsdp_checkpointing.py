"""FSDP2 with EMBEDDING_MODE="tokens": the model is sharded by medsft/distributed.py (shard_tied_token_rows) before
accelerate sees it, and accelerate applies FSDP's activation checkpointing only to a model not yet sharded. The
checkpointing must still be on: each decoder layer runs twice in a step (the recomputation), and the adapter saved
keeps every tensor's name."""
import json
import sys

import pytest

from tests.test_distributed import free_port, launch


@pytest.mark.sharded
def test_fsdp_activation_checkpointing_is_on_when_token_rows_are_sharded_first(tiny_model_dir, short_data_dir,
                                                                              tmp_path):
    done = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   "accelerate_configs/fsdp_qlora.yaml", "--fsdp_activation_checkpointing", "true",
                   "--mixed_precision", "no", "--main_process_port", str(free_port()),
                   "tests/fsdp_checkpointing_entry.py", f"--model_path={tiny_model_dir}",
                   f"--data_dir={short_data_dir}", f"--output_dir={tmp_path / 'out'}", "--max_steps=1",
                   "--batch_size=2", "--gradient_accumulation=1", "--gradient_checkpointing=False",
                   "--report_to=none", "--progress_bar=False", "--optim=adamw_torch"], tmp_path)
    for rank in (0, 1):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert facts["fsdp"] and facts["steps"] == 1, done.stdout[-2000:]
        assert facts["checkpointed_layers"] == 2  # the tiny model's two layers
        assert set(facts["layer_forwards"].values()) == {2}, facts  # forward, and its recomputation (off: 1)
        assert "adapter_model.safetensors" in facts["saved"]  # with every LoRA tensor (check_saved_weights)


def test_fsdp_checkpointing_beside_gradient_checkpointing_is_one_line(monkeypatch, tmp_path, short_data_dir):
    """The Trainer refuses both with a ValueError; the settings check says it first, in one line."""
    import train_lora2
    from medsft.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(UserError, match=r"fsdp_activation_checkpointing: true, which recomputes the activations "
                                        r"itself; pass --gradient_checkpointing=False with it"):
        train_lora2.main([f"--data_dir={short_data_dir}", f"--output_dir={tmp_path}", "--model_path=/does/not/matter"])

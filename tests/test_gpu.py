"""CUDA-only checks (skipped on CPU): the packed and chunked loss under CUDA kernels, and a real QLoRA run."""
import json
import math

import torch

from tests.conftest import FAST_TRAINING, gpu


@gpu
def test_packing_equals_padding_under_cuda_sdpa(tiny_model_dir, sample_data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft.batching import collate
    from medsft.chat_format import build_training_example
    from medsft.losses import token_losses
    from medsft.records import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").cuda()
    rows = [row for _, row in read_jsonl(sample_data_dir / "train.jsonl")][:4]
    examples = [build_training_example(tokenizer, row, 2048) for row in rows]
    with torch.no_grad():
        padded, _ = token_losses(model, {k: v.cuda() for k, v in collate(examples, tokenizer.pad_token_id, False).items()})
        packed, _ = token_losses(model, {k: v.cuda() for k, v in collate(examples, tokenizer.pad_token_id, True).items()}, 64)
    torch.testing.assert_close(packed, padded, rtol=1e-3, atol=1e-3)


@gpu
def test_qlora_run_on_cuda_records_peak_memory(tiny_model_dir, sample_data_dir, tmp_path):
    import train_lora

    train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={sample_data_dir}", f"--output_dir={tmp_path}",
                     *FAST_TRAINING])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] != "cpu" and summary["peak_gpu_mem_gib"] > 0 and summary["peak_gpu_reserved_gib"] > 0
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["best_val_loss"])


@gpu
def test_the_loss_runs_in_the_compute_dtype_on_cuda(tiny_model_dir, sample_data_dir):
    """prepare_model_for_kbit_training leaves fp32 norms and embedding: the loss must still compute in bf16/fp16."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoTokenizer

    from medsft.batching import collate
    from medsft.chat_format import build_training_example
    from medsft.losses import token_losses
    from medsft.model_loading import compute_dtype, load_base_model
    from medsft.records import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = prepare_model_for_kbit_training(load_base_model(str(tiny_model_dir), load_in_4bit=True))
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    rows = [row for _, row in read_jsonl(sample_data_dir / "train.jsonl")][:2]
    batch = collate([build_training_example(tokenizer, r, 512) for r in rows], tokenizer.pad_token_id, True)
    losses, _ = token_losses(model, {k: v.cuda() for k, v in batch.items()}, 64)
    assert seen and set(seen) == {compute_dtype()} and losses.dtype == torch.float32

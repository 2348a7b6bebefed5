"""CUDA-only checks (skipped on CPU): packing under CUDA kernels, no full-vocabulary logits, a real QLoRA run."""
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
    model.config.use_cache = False
    with torch.no_grad():
        padded, _ = token_losses(model, {k: v.cuda() for k, v in collate(examples, tokenizer.pad_token_id, False).items()})
        packed, _ = token_losses(model, {k: v.cuda() for k, v in collate(examples, tokenizer.pad_token_id, True).items()})
    torch.testing.assert_close(packed, padded, rtol=1e-3, atol=1e-3)


@gpu
def test_qlora_run_on_cuda_records_peak_memory(tiny_model_dir, sample_data_dir, tmp_path):
    import train_lora

    train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={sample_data_dir}", f"--output_dir={tmp_path}",
                     *FAST_TRAINING])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] != "cpu" and summary["peak_gpu_mem_gib"] > 0 and summary["peak_gpu_reserved_gib"] > 0
    # device-wide (mem_get_info): torch's reserved memory, the CUDA context and bitsandbytes' paged states
    assert summary["peak_gpu_device_used_gib"] > summary["peak_gpu_reserved_gib"]
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["best_val_loss"])


@gpu
def test_the_loss_runs_in_the_compute_dtype_on_cuda(tiny_model_dir, sample_data_dir):
    """prepare_model_for_kbit_training leaves fp32 norms and embedding: the eval loss must still compute in bf16/fp16."""
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
    losses, _ = token_losses(model, {k: v.cuda() for k, v in batch.items()})
    assert seen and set(seen) == {compute_dtype()} and losses.dtype == torch.float32


@gpu
def test_no_full_vocabulary_logits_in_a_training_step(tiny_model_dir, sample_data_dir, tmp_path, monkeypatch):
    """With liger-kernel (installed by requirements.txt on Linux), the training step's loss never holds the logits
    of every token at once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import train_lora
    from medsft.trainer import QLoRATrainer

    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    widest = []  # per training step: (tokens in the micro-batch, most rows of any [..., vocab] tensor made)

    class LogitShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab:
                    widest[-1][1] = max(widest[-1][1], t.numel() // vocab)
            return out

    original = QLoRATrainer.training_step

    def recorded_step(self, model, inputs, num_items_in_batch=None):
        widest.append([int(inputs["input_ids"].numel()), 0])
        with LogitShapes():
            return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(QLoRATrainer, "training_step", recorded_step)
    result = train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={sample_data_dir}",
                              f"--output_dir={tmp_path}", *FAST_TRAINING, "--use_liger_kernel=True"])
    assert result["trainer"].args.use_liger_kernel
    assert widest and all(rows < tokens for tokens, rows in widest), widest


@gpu
def test_tokens_mode_on_cuda_keeps_the_frozen_embedding_bf16_and_its_output_fp32(tiny_model_dir, short_data_dir,
                                                                                 tmp_path):
    import train_lora2

    result = train_lora2.main([f"--model_path={tiny_model_dir}", f"--data_dir={short_data_dir}",
                               f"--output_dir={tmp_path}", *FAST_TRAINING, "--learning_rate=1e-2"])
    model = result["trainer"].model
    wrapper = model.get_base_model().model.embed_tokens
    assert wrapper.token_adapter.base_layer.weight.dtype == torch.bfloat16
    assert wrapper.token_adapter.trainable_tokens_delta["default"].dtype == torch.float32
    ids = torch.tensor([[151644, 8948, 198]], device="cuda")
    assert wrapper(ids).dtype == torch.float32  # the residual stream stays fp32, as with a widened embedding

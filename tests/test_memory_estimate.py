"""The dry run's "will it fit?" estimate: static parts against real tensors on CPU, a config-only Qwen3-1.7B
folder, the advice when over budget, and Liger by default on CUDA."""
import json
import shutil

import pytest
import torch

import train
import train_lora
import train_lora2
import train_lora3
from medsft.memory_estimate import GB, counted_bytes, estimate_memory, gpu_memory_budget
from medsft.settings import parse_settings

QWEN3_1_7B = {  # Qwen/Qwen3-1.7B's config.json values (written here: no download)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048, "num_hidden_layers": 28,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 6144,
    "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1000000, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "torch_dtype": "bfloat16",
}
RECIPES = {  # the five recipes, and v2's "full" embedding (bitsandbytes' 32-bit states for an nn.Embedding)
    "v1": (train_lora, []), "v2": (train_lora2, []), "v2-full": (train_lora2, ["--embedding_mode=full"]),
    "v3": (train_lora3, []), "bf16-lora": (train_lora, ["--load_in_4bit=False"]), "train.py": (train, []),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_static_parts_match_the_bytes_of_real_tensors_after_one_step_on_cpu(recipe, tiny_model_dir, short_data_dir,
                                                                            tokenizer, tmp_path):
    from transformers import AutoConfig

    from medsft.full_finetune import load_full_model, use_full_model_training
    from medsft.masking import MaskedQuestionDataset
    from medsft.training import build_trainer, load_lora_model, trained_token_indices
    from medsft.training_data import load_training_data

    script, extra = RECIPES[recipe]
    cfg = parse_settings(vars(script), [f"--model_path={tiny_model_dir}", f"--data_dir={short_data_dir}",
                                        f"--output_dir={tmp_path}", "--report_to=none", *extra])
    data = load_training_data(cfg, tokenizer)
    if script is train_lora3:
        data.train_set = MaskedQuestionDataset(data.train_rows, tokenizer, cfg)
    model = load_full_model(str(tiny_model_dir), cfg) if script is train else load_lora_model(str(tiny_model_dir), cfg, data)
    trainer = build_trainer(cfg, model, tokenizer, data)
    if script is train:
        use_full_model_training(trainer, cfg)
    optimizer = trainer.create_optimizer()
    batch = trainer.data_collator([data.train_set[0], data.train_set[1]])
    batch.pop("segments")
    model(**batch).loss.backward()
    counted = counted_bytes(model)
    optimizer.step()
    counted["optimizer"] = counted_bytes(model, optimizer)["optimizer"]

    rows = trained_token_indices(data, cfg)
    estimate = estimate_memory(AutoConfig.from_pretrained(tiny_model_dir), cfg, "cpu", 64, 64,
                               len(rows) if rows else None)
    for part, real in counted.items():
        assert estimate.parts[part] == pytest.approx(real, rel=0.02), (part, estimate.parts[part], real)
    assert counted["optimizer"] > 0 and counted["gradients"] == counted["trainable"]


@pytest.fixture(scope="module")
def qwen3_1_7b_config_only(tmp_path_factory):
    """A Qwen3-1.7B folder as a user has it before downloading the weights: config.json and the tokenizer."""
    from medsft.tiny_model import qwen3_tokenizer_dir

    folder = tmp_path_factory.mktemp("qwen3-1.7b-config-only")
    for file in qwen3_tokenizer_dir().iterdir():
        if file.is_file():
            shutil.copy(file, folder / file.name)
    (folder / "config.json").write_text(json.dumps(QWEN3_1_7B))
    return folder


def dry_run(script, folder, data_dir, tmp_path, capsys, *extra):
    result = script.main([f"--model_path={folder}", f"--data_dir={data_dir}", f"--output_dir={tmp_path}",
                          "--dry_run=True", *extra])
    out = capsys.readouterr().out
    return result["estimate"], out[out.index("==== will it fit?"):]


def test_dry_run_on_a_config_only_qwen3_1_7b_folder_estimates_v1_and_train_py(qwen3_1_7b_config_only, short_data_dir,
                                                                             tmp_path, capsys):
    estimate, out = dry_run(train_lora, qwen3_1_7b_config_only, short_data_dir, tmp_path, capsys)
    print(out)
    assert "1,720,574,976 parameters" in out and "QLoRA" in out and ": fits." in out
    assert estimate.parts["trainable"] == 69_730_304 * 4  # v1's LoRA in fp32 (tests/test_training.py's count)
    assert estimate.parts["weights"] == pytest.approx(1.35 * GB, rel=0.01)  # NF4 layers + bf16 embedding + norms
    for line in ("weights (frozen)", "optimizer states", "gradients", "activations (checkpointing on)",
                 "(off: ", "logits (Liger fused loss)", "(without Liger: ", "evaluation step", "torch-visible peak",
                 "paged optimizer states", "device total", "typical micro-batch p50"):
        assert line in out

    estimate, out = dry_run(train, qwen3_1_7b_config_only, short_data_dir, tmp_path, capsys)
    print(out)
    assert "full fine-tuning (bf16 weights)" in out and "Liger's lm_head gradient" in out
    assert estimate.parts["trainable"] == estimate.parts["gradients"] == 1_720_574_976 * 2
    assert 3.4 * GB < estimate.parts["optimizer"] < 3.6 * GB  # torchao 8-bit AdamW: ~2.03 bytes a weight


def test_over_budget_names_the_setting_to_change_first(qwen3_1_7b_config_only, short_data_dir, tokenizer, capsys):
    from medsft.memory_estimate import print_memory_estimate
    from medsft.training_data import load_training_data

    def estimate(*argv):
        cfg = parse_settings(vars(train_lora2), [f"--data_dir={short_data_dir}", *argv])
        result = print_memory_estimate(str(qwen3_1_7b_config_only), cfg, load_training_data(cfg, tokenizer))
        return result, capsys.readouterr().out

    full, out = estimate("--embedding_mode=full", "--use_liger_kernel=False", "--gpu_memory_gb=7")
    print(out)  # the device total is over 7 GB only by the paged states: they spill to host memory
    assert full.device_total > 7 * GB > full.device_total - full.paged and full.paged > 2.4 * GB
    assert "fits, but the paged optimizer states (2.62 GB) spill to host memory: slower steps, not an out-of-memory" \
        in out and "to fit" not in out
    # the seeds' v2 settings: the typical micro-batches' figures beside the worst case's (README, "The seeds' 14.2 GB")
    for name in ("p50", "p90"):
        typical = full.typical[name]
        assert 0 < typical["tokens"] <= 291 and typical["torch_peak"] < typical["device_total"] <= full.device_total
        assert f"typical micro-batch {name}, {typical['tokens']:,} tokens: torch-visible " \
               f"{typical['torch_peak'] / GB:.2f} GB, device total {typical['device_total'] / GB:.2f} GB" in out
    full, out = estimate("--embedding_mode=full", "--use_liger_kernel=False", "--gpu_memory_gb=5.5")
    assert "logits (full logits, --use_liger_kernel=False)" in out and "does NOT fit" in out
    assert "to fit, change first: --use_liger_kernel=True" in out
    assert "32-bit states for the embedding" in out
    # bitsandbytes keeps fp32 Adam states for the trainable nn.Embedding copy: 8 bytes a value, 2.49 GB at 1.7B
    assert full.parts["optimizer"] > 2 * 4 * 151936 * 2048
    tokens, out = estimate()
    assert tokens.parts["optimizer"] < 0.2 * GB and "merged rows" in tokens.parts and ": fits." in out


def test_gpu_memory_budget_defaults_to_16_gb_without_a_gpu():
    assert gpu_memory_budget(0) == (16.0 if not torch.cuda.is_available() else pytest.approx(
        torch.cuda.get_device_properties(0).total_memory / GB))
    assert gpu_memory_budget(24) == 24.0


def test_a_cuda_run_without_liger_is_refused_with_the_install_command(monkeypatch, short_data_dir, tmp_path):
    import importlib.util

    from medsft import training

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else find_spec(name, *a))
    cfg = parse_settings(vars(train_lora), [f"--data_dir={short_data_dir}", f"--output_dir={tmp_path}"])
    problems = [p for p in training._library_choice_problems(cfg) if "liger" in p]
    assert len(problems) == 1 and "pip install 'liger-kernel>=0.6,<1'" in problems[0]
    assert "--use_liger_kernel=False" in problems[0]
    cfg.USE_LIGER_KERNEL = False
    assert not [p for p in training._library_choice_problems(cfg) if "liger" in p]


def test_the_default_install_brings_liger_on_linux():
    from pathlib import Path

    lines = (Path(__file__).parent.parent / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("liger-kernel>=0.6,<1") and '; sys_platform == "linux"' in line for line in lines)


README_TOKENS = 4 * 2048  # a training micro-batch of 4 x MAX_LENGTH packed: the most the defaults allow
README_EVAL_POSITIONS = 4 * 1443  # an eval micro-batch of 4 p99-long examples, every position trained (an upper bound)
SEEDS_TYPICAL = {"4 median examples (4 × 763)": 4 * 763, "4 p90 examples (4 × 996)": 4 * 996,
                 "worst case (4 × 2,048)": README_TOKENS}  # the dataset's example lengths (README, "The dataset")


def _qwen3_1_7b():
    from transformers import Qwen3Config

    return Qwen3Config(**{k: v for k, v in QWEN3_1_7B.items() if k not in ("architectures", "model_type")})


def readme_memory_table() -> str:
    """The README's tables, from the estimator: Qwen3-1.7B on one CUDA GPU, every recipe with its defaults; then
    the seeds' v2 settings at typical and worst-case micro-batches."""
    config = _qwen3_1_7b()
    recipes = {"v1": (train_lora, []), "v2/v3 (`tokens`)": (train_lora2, []),
               "v2/v3 (`full`)": (train_lora2, ["--embedding_mode=full"]),
               "bf16 LoRA": (train_lora, ["--load_in_4bit=False"]), "`train.py`": (train, [])}
    rows = {name: [] for name in ("weights (frozen)", "adapter / trained weights",
                                  "optimizer states (torch-visible)", "gradients", "activations (checkpointing)",
                                  "logits (Liger)", "logits without Liger",
                                  "merged embedding copies / Liger's lm_head gradient",
                                  "**torch-visible peak** (training step)", "paged optimizer states",
                                  "CUDA context", "**device total** (training step)", "evaluation, device total")}
    for script, extra in recipes.values():
        cfg = parse_settings(vars(script), extra)
        rows_trained = 10_000 if script is train_lora2 and not extra else None  # assumed; the dry run counts the data's
        e = estimate_memory(config, cfg, "cuda", README_TOKENS, README_EVAL_POSITIONS, rows_trained)
        off = estimate_memory(config, parse_settings(vars(script), [*extra, "--use_liger_kernel=False"]), "cuda",
                              README_TOKENS, README_EVAL_POSITIONS, rows_trained)
        values = [e.parts["weights"], e.parts["trainable"], e.parts["optimizer"] - e.paged, e.parts["gradients"],
                  e.parts["activations"], e.parts["logits"], off.parts["logits"],
                  e.parts.get("merged rows", 0) + e.parts.get("liger lm_head grad", 0),
                  e.train_peak - e.outside_torch, e.paged, e.parts["cuda context"], e.train_peak, e.eval_peak]
        for name, value in zip(rows, values):
            rows[name].append(f"{value / GB:.2f}")
    lines = ["| GB, estimated | " + " | ".join(recipes) + " |", "|---" * (len(recipes) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"**{v}**" if name.startswith("**") else v for v in values) + " |"
              for name, values in rows.items()]
    seeds = parse_settings(vars(train_lora2), ["--embedding_mode=full", "--use_liger_kernel=False"])
    lines += ["", "| seeds' v2 settings, GB, estimated | micro-batch tokens | torch-visible peak | device total |",
              "|---|---|---|---|"]
    for name, tokens in SEEDS_TYPICAL.items():
        e = estimate_memory(config, seeds, "cuda", tokens, README_EVAL_POSITIONS)
        lines.append(f"| {name} | {tokens:,} | {e.torch_peak / GB:.2f} | {e.device_total / GB:.2f} |")
    return "\n".join(lines)


def test_the_readme_memory_table_is_the_estimators():
    from pathlib import Path

    table = readme_memory_table()
    for readme in ("README.md", "README_zh.md"):  # on a failure the message is the table to paste
        assert table in (Path(__file__).parent.parent / readme).read_text(encoding="utf-8"), f"{readme}:\n{table}"

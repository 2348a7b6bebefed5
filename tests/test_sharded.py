"""DeepSpeed ZeRO-2 / ZeRO-3 and FSDP2-QLoRA for real: `accelerate launch --config_file accelerate_configs/...`
with 2 CPU processes over gloo, on the tiny Qwen3.

Each launch trains to step 1, then the same command resumes it to step 2 (one launch, both runs: see
tests/sharded_entry.py), and is checked against one process accumulating the same micro-batches. The CPU-only
enabling lives in tests/sharded_entry.py and in `--mixed_precision no` below; the product's path is the GPU one.
`pytest -m "not sharded"` skips the launches.
"""
import importlib.util
import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST_TRAINING
from tests.test_distributed import free_port, launch, records

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

# fp32 AdamW everywhere: 8-bit optimizer states are quantised in blocks, and ZeRO flattens the weights into other
# blocks than one process does, so only an fp32 optimizer can be compared exactly; a constant lr, so that a run
# resumed at step 1 makes the same step 2 as a straight one. The first run ends off the 2-step schedule (its
# evaluation and checkpoint are the end-of-run ones)
SETTINGS = ["--max_steps=2", "--eval_steps=2", "--save_steps=2", "--batch_size=2", "--lora_dropout=0",
            "--log_steps=1", "--report_to=none", "--progress_bar=False", "--sample_max_new_tokens=2",
            "--eval_batch_size=8", "--max_length=320", "--optim=adamw_torch", "--lr_scheduler=constant"]
# the default EMBEDDING_MODE="tokens": only the rows of the data's tokens of the tied embedding trained
V3 = ["--max_steps=-1", "--epochs=2", "--batch_size=5", "--mask_prob=0.5", "--eval_steps=1", "--save_steps=1"]

# 2 ranks with micro-batch B against 1 process accumulating 2 x B: the same gradients summed in another order
# (all-reduce vs accumulation) differ by float32 rounding, ~1e-7 relative. Adam divides each update by the
# gradient's own size, so a weight whose gradient is near 0 can move by up to a whole step (lr 2e-4) either way
# (seen under FSDP2 for v3: 1 element of 4096 off by 9.3e-5, another run 1 of 8192 by 2.6e-5). So each element
# within one step, and each tensor's mean difference within 1e-6: a rank left out moves most weights by ~a step
ATOL, RTOL, MEAN_ATOL = 2e-4, 1e-3, 1e-6


def sharded_launch(config, script, data_dir, model_dir, tmp, *extra, resume_at=1):
    """2 CPU processes under one of accelerate_configs/; the run stops at `resume_at` and is resumed to the end.

    `--mixed_precision no`: the product trains in bf16 only on CUDA (TrainingArguments bf16=False on CPU), and
    transformers (integrations/deepspeed.py, trainer_config_finalize) refuses the config's `bf16.enabled` then.
    """
    out, settings = tmp / "out", [s for s in SETTINGS if script != "train" or not s.startswith("--lora")]

    def run():
        return launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       f"accelerate_configs/{config}", "--mixed_precision", "no", "--main_process_port",
                       str(free_port()), "tests/sharded_entry.py", script, f"--model_path={model_dir}",
                       f"--data_dir={data_dir}", f"--output_dir={out}", *settings, "--gradient_accumulation=1",
                       *extra], tmp, RESUME_AT=str(resume_at))

    try:
        return out, run()
    except AssertionError as failure:
        # seen once in ~10 FSDP2 launches on 2 CPU cores: a rank aborts in native code right after loading
        # ("terminate called without an active exception", SIGABRT) before training starts; that one case gets
        # one fresh try, anything else fails
        if "terminate called without an active exception" not in str(failure):
            raise
        print(f"note: {config} {script}: a rank aborted in native code before training; launching once more",
              file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        for stale in tmp.glob("rank*"):
            stale.unlink()
        return out, run()


def one_process(script, data_dir, model_dir, out, *extra):
    launch([sys.executable, f"{script}.py", f"--model_path={model_dir}", f"--data_dir={data_dir}",
            f"--output_dir={out}", *SETTINGS, "--gradient_accumulation=2", *extra], out.parent)
    return out


@pytest.fixture(scope="session")
def lora_reference(tmp_path_factory, tiny_model_dir, odd_val_data_dir):
    """train_lora.py in one process accumulating 2 micro-batches: what every 2-process launch must equal."""
    return one_process("train_lora", odd_val_data_dir, tiny_model_dir, tmp_path_factory.mktemp("one-v1") / "out")


@pytest.fixture(scope="session")
def v3_reference(tmp_path_factory, tiny_model_dir, short_data_dir):
    return one_process("train_lora3", short_data_dir, tiny_model_dir, tmp_path_factory.mktemp("one-v3") / "out",
                       *V3)


def check_launch(out, done, tmp, sharded: dict, steps: int, resume_at=1):
    """Sharding on, ranks identical, one set of outputs, and the run resumed at `resume_at` went on to the end."""
    facts = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in facts:
        assert {k: rank[k] for k in sharded} == sharded and rank["world_size"] == 2
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert sorted(p.name for p in out.iterdir()) == ["best", f"checkpoint-{resume_at}", f"checkpoint-{steps}", "final",
                                                     "loss.png", "metrics.jsonl", "settings.json", "summary.json"]
    logged = records(out)
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, steps + 1))  # none twice, none lost
    assert done.stdout.count(f"resuming from {out / f'checkpoint-{resume_at}'}") == 1
    assert done.stdout.count("sample answer to a val question") == 2  # one per run, from the main process
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == steps
    return summary, ranks[0]


def assert_same_adapter(a, b):
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys() and len(left) > 0
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=RTOL, atol=ATOL)
        assert (left[key] - right[key]).abs().mean() < MEAN_ATOL, key


def assert_evaluate_reproduces(out, model_dir, data_dir, tmp, adapter=True):
    """evaluate.py on final/ gives the run's best val loss. A full model: evaluate.py loads it in bf16, as it is
    trained on GPUs, while this CPU run kept fp32 weights (ZeRO-3 without mixed precision); rounding every weight to
    bf16 (2^-9 relative) moved the loss by 1.8e-5 relative here, so 1e-4."""
    import evaluate

    summary = json.loads((out / "summary.json").read_text())
    paths = [f"--model_path={model_dir}", f"--adapter_path={out / 'final'}"] if adapter \
        else [f"--model_path={out / 'final'}", "--adapter_path="]
    report = evaluate.main([*paths, f"--data_dir={data_dir}",
                            f"--report_path={tmp / 'report.json'}", "--eval_batch_size=8"])
    assert report["val_loss"] == pytest.approx(summary["best_val_loss"], rel=1e-5 if adapter else 1e-4)


def check_against_one_process(out, reference):
    summary, single = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert summary["train_tokens"] == single["train_tokens"] > 0 and summary["best_step"] == single["best_step"]
    assert summary["best_val_loss"] == pytest.approx(single["best_val_loss"], rel=1e-5)
    assert_same_adapter(out / "final", reference / "final")


@pytest.mark.sharded
@needs_deepspeed
@pytest.mark.parametrize("config, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_zero_trains_train_lora_like_one_process(config, stage, tiny_model_dir, odd_val_data_dir,
                                                          lora_reference, tmp_path):
    out, done = sharded_launch(config, "train_lora", odd_val_data_dir, tiny_model_dir, tmp_path)
    summary, _ = check_launch(out, done, tmp_path, {"deepspeed": True, "zero_stage": stage}, steps=2)
    if stage == 3:  # every weight, the 4-bit base's too, partitioned over the two processes
        facts = json.loads((tmp_path / "rank0.json").read_text())
        assert facts["partitioned"] == facts["parameters"] > 0
    assert summary["sharding"] == "deepspeed"
    check_against_one_process(out, lora_reference)
    assert_evaluate_reproduces(out, tiny_model_dir, odd_val_data_dir, tmp_path)


@pytest.mark.sharded
@pytest.mark.parametrize("script", ["train_lora", "train_lora3"])
def test_fsdp2_qlora_trains_like_one_process(script, tiny_model_dir, odd_val_data_dir, short_data_dir, request,
                                            tmp_path):
    v3 = script == "train_lora3"
    data_dir, extra = (short_data_dir, V3) if v3 else (odd_val_data_dir, [])
    # v3: one step per epoch; resumed after epoch 1
    out, done = sharded_launch("fsdp_qlora.yaml", script, data_dir, tiny_model_dir, tmp_path, *extra)
    summary, _ = check_launch(out, done, tmp_path, {"fsdp": True, "fsdp_version": 2}, steps=2)
    facts = json.loads((tmp_path / "rank0.json").read_text())
    assert facts["partitioned"] == facts["parameters"] > 0  # every weight a shard (DTensor)
    assert summary["sharding"] == "fsdp"
    check_against_one_process(out, request.getfixturevalue("v3_reference" if v3 else "lora_reference"))
    assert_evaluate_reproduces(out, tiny_model_dir, data_dir, tmp_path)
    if v3:  # the epoch's masks were drawn alike on both ranks
        masked = [(r["step"], r["masked_terms"]) for r in records(out) if "masked_terms" in r]
        assert masked and masked[-1][1] > 0
        assert_only_the_datas_rows_trained(out / "final", tiny_model_dir)


def assert_only_the_datas_rows_trained(adapter, model_dir):
    """EMBEDDING_MODE="tokens" under FSDP2: the adapter holds the data's rows only, the tied embedding and lm_head
    stay one matrix, and every other row is the base's, bit for bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"]["embed_tokens"]
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    before = base.model.embed_tokens.weight.detach().clone()
    inner = PeftModel.from_pretrained(base, str(adapter)).get_base_model()
    embedding = inner.model.embed_tokens.weight.detach()  # PEFT's merged view: base rows + trained rows
    assert torch.equal(inner.lm_head.weight.detach(), embedding)
    unseen = torch.ones(len(before), dtype=torch.bool)
    unseen[seen] = False
    assert 0 < len(seen) < 1000 and torch.equal(embedding[unseen], before[unseen])
    assert not torch.equal(embedding[seen], before[seen])


@pytest.mark.sharded
@needs_deepspeed
def test_deepspeed_zero3_trains_the_full_model_with_train_py(tiny_model_dir, odd_val_data_dir, tmp_path):
    out, done = sharded_launch("deepspeed_zero3.yaml", "train", odd_val_data_dir, tiny_model_dir, tmp_path,
                               "--learning_rate=1e-3", "--optim=adamw_torch_8bit")
    summary, weights = check_launch(out, done, tmp_path, {"deepspeed": True, "zero_stage": 3}, steps=2)
    facts = json.loads((tmp_path / "rank0.json").read_text())
    assert facts["partitioned"] == facts["parameters"] == len(weights) > 10  # partitioned at load, all trained
    assert "optimizer is adamw_torch instead of adamw_torch_8bit" in done.stdout
    losses = [r["eval_loss"] for r in records(out) if "eval_loss" in r]
    assert losses[-1] < losses[0] < 11.94  # the loss falls
    assert_evaluate_reproduces(out, tiny_model_dir, odd_val_data_dir, tmp_path, adapter=False)


def test_a_save_that_drops_a_tensor_stops_the_run(monkeypatch, tiny_model_dir, odd_val_data_dir, tmp_path):
    import train_lora
    from safetensors.torch import save_file

    from medsft.errors import UserError
    from medsft.trainer import QLoRATrainer

    original = QLoRATrainer.save_model

    def save_dropping_one(self, output_dir=None, _internal_call=False):
        original(self, output_dir, _internal_call)
        file = os.path.join(output_dir, "adapter_model.safetensors")
        tensors = load_file(file)
        tensors.pop(sorted(tensors)[0])
        save_file(tensors, file)

    monkeypatch.setattr(QLoRATrainer, "save_model", save_dropping_one)
    with pytest.raises(UserError) as e:
        train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={odd_val_data_dir}",
                         f"--output_dir={tmp_path}", *FAST_TRAINING])
    message = str(e.value)
    assert message.startswith(f"error: the saved weights in {tmp_path / 'best.tmp'} are incomplete: it lacks 1 of ")
    assert "layers.0.mlp.down_proj.lora_A.weight" in message and "\n" not in message
    assert not (tmp_path / "best").exists() and not (tmp_path / "final").exists()  # nothing shipped


def test_a_launcher_asking_for_sharding_the_trainer_does_not_use_stops(monkeypatch):
    from medsft.distributed import check_sharding_is_on
    from medsft.errors import UserError

    trainer = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False, args=SimpleNamespace(world_size=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="^error: the accelerate config asks for fsdp, but the Trainer runs without"):
        check_sharding_is_on(trainer)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_sharding_is_on(trainer)  # plain DDP: nothing to check
    trainer.args.world_size = 1
    with pytest.raises(UserError, match="2 processes were launched but the Trainer sees 1"):
        check_sharding_is_on(trainer)


def test_token_rows_under_fsdp_of_a_bf16_lora_stop_before_loading(monkeypatch, tmp_path, short_data_dir):
    """QLoRA runs them (test_fsdp2_qlora_trains_like_one_process); a bf16 model is loaded on rank 0 only, which
    the FSDP2 units made before accelerate's would skip."""
    import train_lora3
    from medsft.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=r"embedding_mode 'tokens' under FSDP needs load_in_4bit=True \(QLoRA\)"):
        train_lora3.main([f"--data_dir={short_data_dir}", f"--output_dir={tmp_path}", "--model_path=/does/not/matter",
                          "--load_in_4bit=False"])

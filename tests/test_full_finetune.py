"""train.py (full fine-tuning) on the tiny Qwen3: final/ is a whole model that the other scripts take as is, and
bf16 weights keep learning at lr 5e-6 thanks to stochastic rounding."""
import json
import shutil

import pytest
import torch

import data
import evaluate
import inference_lora
import train
from medsft.errors import UserError
from tests.conftest import FAST_TRAINING, SAMPLE, gpu


@pytest.fixture(scope="module")
def gold_data_dir(tmp_path_factory):
    """The sample split with a test split and a gold set of 5 rows."""
    out = tmp_path_factory.mktemp("gold-split")
    data.main([f"--source={SAMPLE}", f"--data_dir={out}", "--test_fraction=0.1", "--gold_size=5"])
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, gold_data_dir):
    """OUTPUT_DIR of `python train.py --max_steps=3` on the tiny model (eval at steps 2 and 3)."""
    out = tmp_path_factory.mktemp("full")
    result = train.main([f"--model_path={tiny_model_dir}", f"--data_dir={gold_data_dir}", f"--output_dir={out}",
                         *FAST_TRAINING])
    return out, result


def weights(folder):
    from safetensors.torch import load_file

    return load_file(next(iter(sorted(folder.glob("model*.safetensors")))))


# ---- train.py writes a whole model that the other scripts take as is -----------------------------------------


def test_final_is_a_plain_model_folder_with_many_changed_tensors(full_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out, result = full_run
    final = out / "final"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "settings.json"):
        assert (final / name).is_file(), name
    assert not (final / "adapter_config.json").exists() and not (final / "eval.json").exists()
    settings = json.loads((final / "settings.json").read_text())
    assert settings["VERSION"] == "full" and settings["LOAD_IN_4BIT"] is False and settings["LEARNING_RATE"] == 5e-6
    sampling = json.loads((final / "generation_config.json").read_text())
    assert sampling["do_sample"] is True and sampling["temperature"] == 0.6 and sampling["top_k"] == 20

    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.dtype == torch.bfloat16
    before, after = weights(tiny_model_dir), weights(final)
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    matrices = [name for name in before if before[name].ndim == 2]
    assert set(matrices) <= set(changed)  # every matrix, the embedding included, took the lr ~5e-6 updates

    summary = json.loads((out / "summary.json").read_text())
    assert summary["version"] == "full" and summary["steps"] == 3 and summary["best_step"] in (2, 3)
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters())
    assert result["summary"] == summary


def test_inference_answers_with_the_full_model(full_run, capsys):
    out, _ = full_run
    inference_lora.main([f"--model_path={out / 'final'}", "--adapter_path=", "-q", "头痛怎么办？",
                         "--max_new_tokens=6", "--temperature=0"])
    printed = capsys.readouterr().out
    assert f"loaded {out / 'final'} (no adapter)" in printed and "6 new tokens" in printed


def test_evaluate_reproduces_the_best_val_loss_and_reports_gold_loss(full_run, gold_data_dir, tmp_path):
    out, _ = full_run
    summary = json.loads((out / "summary.json").read_text())
    report = evaluate.main([f"--model_path={out / 'final'}", "--adapter_path=", f"--data_dir={gold_data_dir}",
                            "--eval_batch_size=8", f"--report_path={tmp_path / 'r.json'}",
                            "--no_think_check=0"])  # settings: final/'s
    # the same bf16 weights, examples and computation as the training-time eval
    assert report["val_loss"] == pytest.approx(summary["best_val_loss"], rel=1e-6)
    assert report["gold_examples"] == 5 and report["gold_tokens"] > 0
    for key in ("gold_loss", "gold_think_loss", "gold_answer_loss", "test_loss"):
        assert 0 < report[key] < 20, key
    assert json.loads((tmp_path / "r.json").read_text())["gold_loss"] == report["gold_loss"]


def test_generate_can_draw_its_questions_from_the_gold_set(full_run, gold_data_dir, tmp_path):
    out, _ = full_run
    evaluate.main([f"--model_path={out / 'final'}", "--adapter_path=", f"--data_dir={gold_data_dir}",
                   "--generate=2", "--generate_from=gold", "--max_new_tokens=2", "--batch_size=32",
                   f"--report_path={tmp_path / 'r.json'}", "--no_think_check=0"])
    gold = [json.loads(line) for line in (gold_data_dir / "gold.jsonl").read_text().splitlines()]
    asked = [json.loads(line) for line in (tmp_path / "r.questions.jsonl").read_text().splitlines()]
    assert [r["question"] for r in asked[:2]] == [r["question"] for r in gold[:2]]
    assert [r["id"] for r in asked[:2]] == [f"gold-{r['id']}" for r in gold[:2]]


def test_resume_continues_with_the_saved_8bit_optimizer_state(full_run, tiny_model_dir, gold_data_dir, tmp_path,
                                                              capsys):
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    result = train.main([f"--model_path={tiny_model_dir}", f"--data_dir={gold_data_dir}", f"--output_dir={out}",
                         *FAST_TRAINING, "--max_steps=4"])
    assert "resuming from" in capsys.readouterr().out and result["summary"]["steps"] == 4
    optimizer = result["trainer"].optimizer
    state = next(s for s in optimizer.state.values() if type(s["exp_avg"]).__name__ == "OptimState8bit")
    assert int(state["step"]) == 4  # 3 steps restored from checkpoint-3, then one more


def test_restore_best_puts_the_best_weights_back(full_run):
    out, result = full_run
    trainer = result["trainer"]
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    best = dict(trainer.best)
    trainer.best["step"] = trainer.state.global_step - 1  # as if a later step had been worse
    try:
        trainer.restore_best()
    finally:
        trainer.best = best
    restored = trainer.model.state_dict()
    saved = weights(out / "best")
    assert saved and all(torch.equal(restored[k].cpu(), v) for k, v in saved.items())


def test_settings_that_would_not_learn_are_refused_before_loading(tmp_path, sample_data_dir, monkeypatch):
    with pytest.raises(UserError) as e:
        train.main([f"--data_dir={sample_data_dir}", f"--output_dir={tmp_path}", "--load_in_4bit=True",
                    "--optim=paged_adamw_8bit", "--bf16_stochastic_round=False", "--model_path=/nonexistent"])
    message = str(e.value)
    assert "load_in_4bit must be False" in message and "rounds bf16 weights to nearest" in message
    assert "bf16_stochastic_round=False" in message
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # FSDP keeps no fp32 copy of bf16 weights
    with pytest.raises(UserError, match="under FSDP pass --fp32_weights=True"):
        train.main([f"--data_dir={sample_data_dir}", f"--output_dir={tmp_path}", "--model_path=/nonexistent"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # ZeRO keeps fp32 master weights: any AdamW will do
    with pytest.raises(UserError) as e:
        train.main([f"--data_dir={sample_data_dir}", f"--output_dir={tmp_path}", "--optim=adamw_torch",
                    "--model_path=/nonexistent"])
    assert "nearest" not in str(e.value) and "/nonexistent" in str(e.value)


# ---- bf16 weights keep learning at lr 5e-6 ------------------------------------------------------------------
#
# Round-to-nearest loses every update smaller than half a bf16 step: |w| * 2^-8 is ~6e-5 for the tiny model's
# typical weight (|w| ~ 0.016), ten times lr 5e-6. Stochastic rounding keeps each update in expectation. We measure
# the share of the exact (fp32) update that the bf16 weights took: sum((w_end - w_0) * s) / sum(|u|), where u is the
# fp32 run's update and s its sign. The fp32 run uses the same optimizer on fp32 copies of the weights, so only the
# rounding of the weights differs. Tolerance: each weight's rounding error has variance <= ulp * |u|, so the share's
# standard deviation is ~ sqrt(ulp / (N * |u|)): ~2% for one step of lr 5e-6 over the N = 74k decoder weights, and
# ~0.6% after 20 steps over layer 0's 37k. We allow 10% and 3% (5 standard deviations); round-to-nearest keeps ~9%.
# The embedding is left out only for speed: an eager 8-bit step over its 9.7M weights takes ~10 s on CPU.


@pytest.fixture(scope="module")
def decoder_weights_and_grads(tiny_model_dir):
    """The tiny model's bf16 decoder weights and the gradients of a real loss on sample rows."""
    from medsft.batching import Collator
    from medsft.chat_format import build_training_example
    from medsft.losses import token_losses
    from medsft.model_loading import load_base_model, load_tokenizer
    from medsft.records import read_jsonl

    model = load_base_model(str(tiny_model_dir), False)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [row for _, row in read_jsonl(SAMPLE)][:4]
    batch = Collator(tokenizer.pad_token_id, True)([build_training_example(tokenizer, r, 320) for r in rows])
    losses, _ = token_losses(model, batch)
    losses.mean().backward()
    named = [(n, p) for n, p in model.named_parameters() if "embed_tokens" not in n]
    assert all(p.dtype == torch.bfloat16 and p.grad is not None for _, p in named)
    return [n for n, _ in named], [p.detach().clone() for _, p in named], [p.grad.clone() for _, p in named]


def adamw_8bit_steps(start, grads, dtype, stochastic_round: bool, steps: int, lr=5e-6, device="cpu"):
    from medsft.full_finetune import low_bit_adamw

    params = [torch.nn.Parameter(w.to(device, dtype, copy=True)) for w in start]
    optimizer = low_bit_adamw("adamw_torch_8bit")(params, lr=lr, weight_decay=0.0,
                                                 bf16_stochastic_round=stochastic_round)
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g.to(device, dtype)
        optimizer.step()
    return [p.detach().float().cpu() for p in params]


def share_of_exact_update(start, end, exact) -> float:
    start, end, exact = (torch.cat([t.float().flatten() for t in ts]) for ts in (start, end, exact))
    update = exact - start
    return float(((end - start) * update.sign()).sum() / update.abs().sum())


def test_a_bf16_step_at_lr_5e_6_changes_the_weights(decoder_weights_and_grads):
    names, start, grads = decoder_weights_and_grads
    exact = adamw_8bit_steps(start, grads, torch.float32, False, steps=1)
    rounded = adamw_8bit_steps(start, grads, torch.bfloat16, stochastic_round=False, steps=1)
    stochastic = adamw_8bit_steps(start, grads, torch.bfloat16, stochastic_round=True, steps=1)

    assert 0.9 < share_of_exact_update(start, stochastic, exact) < 1.1
    assert share_of_exact_update(start, rounded, exact) < 0.2  # the failure this guards against
    for name, w0, w_sr, w_rn in zip(names, start, stochastic, rounded):
        if w0.ndim == 2:
            assert not torch.equal(w0.float(), w_sr), name
        if torch.all(w0 == 1):  # the RMSNorm weights: round-to-nearest never moves them
            assert torch.equal(w0.float(), w_rn), name


def test_many_small_bf16_steps_add_up_to_the_fp32_result(decoder_weights_and_grads):
    names, start, grads = decoder_weights_and_grads
    start, grads = zip(*[(w, g) for name, w, g in zip(names, start, grads) if ".layers.0." in name])
    exact = adamw_8bit_steps(start, grads, torch.float32, False, steps=20)
    stochastic = adamw_8bit_steps(start, grads, torch.bfloat16, stochastic_round=True, steps=20)
    rounded = adamw_8bit_steps(start, grads, torch.bfloat16, stochastic_round=False, steps=20)
    assert share_of_exact_update(start, stochastic, exact) == pytest.approx(1.0, abs=0.03)
    assert share_of_exact_update(start, rounded, exact) < 0.5


@gpu
def test_on_gpu_the_compiled_step_keeps_small_updates_too(decoder_weights_and_grads):
    _, start, grads = decoder_weights_and_grads
    exact = adamw_8bit_steps(start, grads, torch.float32, False, steps=1, device="cuda")
    stochastic = adamw_8bit_steps(start, grads, torch.bfloat16, stochastic_round=True, steps=1, device="cuda")
    assert 0.9 < share_of_exact_update(start, stochastic, exact) < 1.1


# ---- several GPUs -------------------------------------------------------------------------------------------


def _replica_check_worker(rank, init_file, results):
    import torch.distributed as dist

    from medsft.full_finetune import sync_replicas

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    if rank == 1:  # one stochastic rounding that went the other way on this rank
        with torch.no_grad():
            model.weight.view(torch.int16)[0, 0] += 1  # the neighbouring bf16 number
    first, second = sync_replicas(model), sync_replicas(model)
    results[rank] = (first, second, model.weight.float().sum().item())
    dist.destroy_process_group()


def test_replicas_that_drifted_apart_are_detected_and_resynced(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_replica_check_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    assert results[0][:2] == results[1][:2] == (False, True)
    assert results[0][2] == results[1][2]


def test_generate_from_gold_without_a_gold_set_is_refused_before_loading(sample_data_dir, tmp_path):
    with pytest.raises(UserError, match="gold.jsonl is not there; run `python data.py --gold_size=N`"):
        evaluate.main(["--model_path=/nonexistent", f"--data_dir={sample_data_dir}", "--generate=2",
                       "--generate_from=gold", f"--report_path={tmp_path / 'r.json'}"])
    with pytest.raises(UserError, match="generate_from must be 'val' or 'gold'"):
        evaluate.main([f"--data_dir={sample_data_dir}", "--generate_from=test", f"--report_path={tmp_path / 'r.json'}"])

"""The same command gives the same adapter, accumulation is exact, and a resume never changes the run silently."""
import json

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from medsft.errors import UserError
from tests.conftest import FAST_TRAINING, two_step_run


def run(tiny_model_dir, data_dir, out, *extra):
    return train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={data_dir}", f"--output_dir={out}",
                            *FAST_TRAINING, *extra])


def adapter(folder):
    return load_file(folder / "final" / "adapter_model.safetensors")


def test_the_same_command_gives_the_same_adapter_bit_for_bit(train_once, tiny_model_dir, short_data_dir, tmp_path):
    earlier = two_step_run(train_once, short_data_dir, tmp_path / "a")  # trained earlier in this session
    run(tiny_model_dir, short_data_dir, tmp_path / "b", "--max_steps=2", "--save_steps=1")
    first, second = adapter(earlier), adapter(tmp_path / "b")
    assert first.keys() == second.keys() and len(first) > 0
    assert all(torch.equal(first[k], second[k]) for k in first)
    run(tiny_model_dir, short_data_dir, tmp_path / "c", "--max_steps=2", "--save_steps=1", "--seed=7")
    assert not all(torch.equal(first[k], v) for k, v in adapter(tmp_path / "c").items())  # the seed matters


def test_4_by_1_and_2_by_2_accumulation_give_the_same_update(tiny_model_dir, short_data_dir, tmp_path):
    # plain SGD makes the update proportional to the gradient (Adam's first step is about lr * sign(gradient),
    # which turns rounding-level differences of near-zero gradients into whole steps)
    common = ["--max_steps=2", "--save_steps=2", "--eval_steps=2", "--lora_dropout=0", "--learning_rate=0.5",
              "--optim=sgd", "--lr_scheduler=constant"]
    one = run(tiny_model_dir, short_data_dir, tmp_path / "4x1", *common, "--batch_size=4", "--gradient_accumulation=1")
    two = run(tiny_model_dir, short_data_dir, tmp_path / "2x2", *common, "--batch_size=2", "--gradient_accumulation=2")
    first, second = adapter(tmp_path / "4x1"), adapter(tmp_path / "2x2")
    for key in first:  # bf16 compute on packed rows of 4 vs 2 examples: equal up to rounding, relative to the scale
        scale = first[key].abs().max()
        assert (second[key] - first[key]).abs().max() <= 2e-3 * scale, key
    lora_b = [k for k in first if "lora_B" in k]
    assert lora_b and all(first[k].abs().max() > 1e-5 for k in lora_b)  # lora_B starts at 0: it was updated
    assert one["summary"]["best_val_loss"] == pytest.approx(two["summary"]["best_val_loss"], rel=1e-5)


def test_a_resume_with_another_learning_rate_is_refused(train_once, tiny_model_dir, short_data_dir, tmp_path):
    two_step_run(train_once, short_data_dir, tmp_path)
    settings = (tmp_path / "settings.json").read_text()
    final = (tmp_path / "final" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError) as e:
        run(tiny_model_dir, short_data_dir, tmp_path, "--max_steps=4", "--save_steps=1", "--learning_rate=1e-3",
            "--batch_size=1")
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "--overwrite=True" in message
    assert "learning_rate 0.0002 → 0.001" in message and "batch_size 2 → 1" in message
    assert (tmp_path / "settings.json").read_text() == settings  # nothing was touched
    assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() == final
    assert not (tmp_path / "checkpoint-3").exists()


def test_a_resume_may_extend_the_run_and_change_its_cadence(train_once, tiny_model_dir, short_data_dir, tmp_path,
                                                             capsys):
    two_step_run(train_once, short_data_dir, tmp_path)
    capsys.readouterr()
    result = run(tiny_model_dir, short_data_dir, tmp_path, "--max_steps=3", "--save_steps=1", "--eval_steps=1",
                 "--log_steps=2")
    out = capsys.readouterr().out
    assert "extending the run (max_steps 2 → 3)" in out and f"resuming from {tmp_path / 'checkpoint-2'}" in out
    assert result["summary"]["steps"] == 3
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["MAX_STEPS"] == 3 and saved["EVAL_STEPS"] == 1  # settings.json says what was used


def test_a_resume_on_other_data_is_refused(tiny_model_dir, short_data_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(short_data_dir, data)
    run(tiny_model_dir, data, tmp_path / "o", "--max_steps=2", "--save_steps=1")
    with (data / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"question": "新问题？", "think": "想。", "answer": "答。"}, ensure_ascii=False) + "\n")
    with pytest.raises(UserError, match="data_sha256"):
        run(tiny_model_dir, data, tmp_path / "o", "--max_steps=4", "--save_steps=1")

"""Two training processes on CPU for real (gloo): torchrun and the README's accelerate launch command.

Each multi-process run is compared with one process accumulating the same micro-batches: N ranks with
micro-batch B must make the same update as one process with N x B per step (LORA_DROPOUT=0).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from tests.conftest import ROOT

SETTINGS = ["--max_steps=2", "--eval_steps=2", "--save_steps=2", "--batch_size=2", "--lora_dropout=0",
            "--log_steps=1", "--report_to=none", "--progress_bar=False", "--sample_max_new_tokens=2",
            "--eval_batch_size=8", "--max_length=320"]

# runs a training script's main() as one rank, then saves that rank's trainable weights for the test
ENTRY = """
import importlib, os, sys
sys.path.insert(0, os.getcwd())
import torch
result = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
trainer = result["trainer"]
weights = {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
torch.save(weights, os.path.join(os.environ["RANK_WEIGHTS_DIR"], f"rank{trainer.args.process_index}.pt"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command, tmp_path, **env):
    """Run a launcher with 2 CPU processes; returns the finished process (stdout and stderr captured)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_WEIGHTS_DIR": str(tmp_path), **env}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchrun(script, tiny_model_dir, data_dir, out, tmp_path, *extra):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(entry), script, f"--model_path={tiny_model_dir}", f"--data_dir={data_dir}",
                   f"--output_dir={out}", *SETTINGS, "--gradient_accumulation=1", *extra], tmp_path)


def one_process(script, tiny_model_dir, data_dir, out, *extra):
    """The same training in one process accumulating 2 micro-batches, with the same one thread per process:
    4-bit CPU matmuls compute in bf16, where a different thread count rounds differently."""
    return launch([sys.executable, f"{script}.py", f"--model_path={tiny_model_dir}", f"--data_dir={data_dir}",
                   f"--output_dir={out}", *SETTINGS, "--gradient_accumulation=2", *extra], out.parent)


def assert_same_adapter(a, b):
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=1e-6)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# the torchrun run: trained to step 1 (an end-of-run evaluation and checkpoint off the 2-step schedule), then the
# same command resumes it to step 2 (tests/sharded_entry.py, one launch); a constant lr, so that the resumed run
# must make the same step 2 as the straight one-process run
DDP = [*SETTINGS, "--lr_scheduler=constant", "--gradient_accumulation=1"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, odd_val_data_dir):
    tmp = tmp_path_factory.mktemp("ddp")
    done = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "tests/sharded_entry.py", "train_lora", f"--model_path={tiny_model_dir}",
                   f"--data_dir={odd_val_data_dir}", f"--output_dir={tmp / 'out'}", *DDP], tmp, RESUME_AT="1")
    return tmp, done


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir, odd_val_data_dir):
    out = tmp_path_factory.mktemp("one-process")
    one_process("train_lora", tiny_model_dir, odd_val_data_dir, out, "--lr_scheduler=constant")
    return out


def test_torchrun_two_processes_train_one_model_resume_it_and_write_one_set_of_outputs(ddp_run, one_process_run):
    tmp, done = ddp_run
    out = tmp / "out"
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoint-1", "checkpoint-2", "final", "loss.png",
                                                     "metrics.jsonl", "settings.json", "summary.json"]
    logged = records(out)
    assert len({json.dumps(r, sort_keys=True) for r in logged}) == len(logged)  # no record written twice
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]  # the first run's records kept, none twice
    assert [r["step"] for r in logged if "eval_loss" in r] == [1, 2]
    first, second = done.stdout.split("==== the same command again ====\n")
    for run in (first, second):  # only the main process prints
        assert run.count("sample answer to a val question") == 1 and run.count("QLoRA v1 settings") == 1
    assert "resuming from" not in first and second.count(f"resuming from {out / 'checkpoint-1'}") == 1
    assert second.count("step 2/2 | epoch") == 2

    ranks = [torch.load(tmp / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # DDP kept the ranks identical

    # 2 ranks x 2, stopped at step 1 and resumed == 1 process accumulating 2 x 2 straight through
    assert_same_adapter(out / "final", one_process_run / "final")
    summary, single = (json.loads((d / "summary.json").read_text()) for d in (out, one_process_run))
    half = json.loads((tmp / "first_summary.json").read_text())
    assert summary["processes"] == 2 and summary["sharding"] == "ddp" and single["processes"] == 1
    assert summary["steps"] == 2 and summary["wall_time_s"] > half["wall_time_s"]  # the whole run counted
    assert summary["train_tokens"] == single["train_tokens"] > half["train_tokens"] > 0  # every rank's tokens
    assert summary["best_step"] == single["best_step"]
    assert summary["best_val_loss"] == pytest.approx(single["best_val_loss"], rel=1e-6)


def test_the_val_loss_over_both_ranks_equals_evaluate_py_on_the_adapter(ddp_run, tiny_model_dir,
                                                                         odd_val_data_dir):
    import evaluate

    tmp, _ = ddp_run
    summary = json.loads((tmp / "out" / "summary.json").read_text())
    report = evaluate.main([f"--model_path={tiny_model_dir}", f"--adapter_path={tmp / 'out' / 'final'}",
                            f"--data_dir={odd_val_data_dir}", f"--report_path={tmp / 'report.json'}",
                            "--eval_batch_size=8", "--no_think_check=0"])
    assert report["val_loss"] == pytest.approx(summary["best_val_loss"], rel=1e-6)
    logged = next(r for r in records(tmp / "out") if r.get("step") == summary["best_step"] and "eval_loss" in r)
    assert report["val_tokens"] == logged["eval_tokens"]  # the ranks' shares add up to the whole val set


def test_a_finished_run_launched_again_under_any_number_of_processes_says_so_and_exits_0(ddp_run, tiny_model_dir,
                                                                                          odd_val_data_dir, capsys):
    tmp, _ = ddp_run
    out = tmp / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    same = ["train_lora.py", f"--model_path={tiny_model_dir}", f"--data_dir={odd_val_data_dir}",
            f"--output_dir={out}", *DDP]  # the command that trained it (the entry ran this main)
    done = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *same], tmp)
    assert train_lora.main(same[1:]) is None  # and in one process
    for printed in (done.stdout, capsys.readouterr().out):
        assert printed.count(f"{out} holds this run, finished (2 steps, best val loss ") == 1, printed
        assert f"the result is in {out / 'final'}/" in printed and "settings ----" not in printed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing rewritten


def test_readme_accelerate_launch_trains_v3_with_the_same_masks_on_every_rank(tiny_model_dir, short_data_dir,
                                                                                tmp_path):
    out, single = tmp_path / "out", tmp_path / "single"
    v3 = ["--max_steps=-1", "--epochs=2", "--batch_size=5", "--mask_prob=0.5", "--eval_steps=100",
          "--save_steps=100"]
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/multi_gpu.yaml",
            "--main_process_port", str(free_port()), "train_lora3.py", f"--model_path={tiny_model_dir}",
            f"--data_dir={short_data_dir}", f"--output_dir={out}", *SETTINGS, "--gradient_accumulation=1", *v3],
           tmp_path)
    one_process("train_lora3", tiny_model_dir, short_data_dir, single, *v3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and summary["epochs"] == 2
    masked = [(r["step"], r["masked_terms"], r["found_terms"]) for r in records(out) if "masked_terms" in r]
    assert masked == [(r["step"], r["masked_terms"], r["found_terms"]) for r in records(single) if "masked_terms" in r]
    assert masked[-1][1] > 0
    assert_same_adapter(out / "final", single / "final")  # epoch 2's masks were drawn alike on both ranks


def test_a_launch_that_cannot_work_stops_before_loading(monkeypatch, tmp_path, sample_data_dir):
    from medsft.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")
    with pytest.raises(UserError) as e:  # no model is loaded: the path does not even exist
        train_lora.main([f"--data_dir={sample_data_dir}", f"--output_dir={tmp_path}", "--model_path=/does/not/matter"])
    assert "fsdp_state_dict_type must be FULL_STATE_DICT" in str(e.value)


def test_torchrun_trains_one_full_model_with_train_py(tiny_model_dir, short_data_dir, tmp_path):
    out = tmp_path / "out"
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    full = [s for s in SETTINGS if not s.startswith("--lora_dropout")] + ["--learning_rate=1e-3"]
    done = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(entry),
                   "train", f"--model_path={tiny_model_dir}", f"--data_dir={short_data_dir}", f"--output_dir={out}",
                   *full, "--gradient_accumulation=1"], tmp_path)
    assert done.stdout.count("full fine-tuning settings") == 1 and "drifted apart" not in done.stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]) > 10 and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and (out / "final" / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in final.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) > 10

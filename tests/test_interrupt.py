"""Ctrl-C is normal: one line on how to go on, no traceback, nothing half-written; resumes keep their settings."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import inference_lora
import train_lora
from medsft.errors import UserError
from tests.conftest import ROOT, SHORT_QUESTIONS


def ctrl_c_as_in_a_terminal():
    """A child of a suite started in the background (`pytest &`) would inherit an ignored SIGINT; undo that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_as_in_a_terminal)


def interrupt_when(process, ready, timeout=240):
    """Send SIGINT once ready() is true; return (returncode, stdout, stderr)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the run never got far enough to be interrupted"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def test_sigint_during_batch_inference(tiny_model_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in SHORT_QUESTIONS * 2),
                         encoding="utf-8")
    output = tmp_path / "out.jsonl"
    args = ["inference_lora.py", f"--model_path={tiny_model_dir}", "--adapter_path=", f"--batch_file={questions}",
            f"--output_file={output}", "--batch_size=1", "--max_new_tokens=32", "--temperature=0"]

    def two_rows():
        return output.is_file() and output.read_text(encoding="utf-8").count("\n") >= 2

    code, out, err = interrupt_when(start(args), two_rows)
    assert code == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "run the same command again" in last and str(output) in last
    text = output.read_text(encoding="utf-8")
    assert text.endswith("\n") and all(json.loads(line)["finish_reason"] for line in text.splitlines())
    answered = len(text.splitlines())
    assert f"{answered} of {2 * len(SHORT_QUESTIONS)} questions are answered" in last
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files
    inference_lora.main(args[1:])  # the same command again (in this process: only the interrupt needed a real one)
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * len(SHORT_QUESTIONS) and len({r["id"] for r in rows}) == len(rows)


def test_ctrl_c_while_a_batch_is_written_waits_for_the_whole_rows(tiny_model_dir, tmp_path, monkeypatch,
                                                                 python_ctrl_c):
    """The race CI once hit: Ctrl-C lands inside the append's fsync. The rows are whole, the count is right."""
    import medsft.assistant

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in SHORT_QUESTIONS[:3]),
                         encoding="utf-8")
    output = tmp_path / "out.jsonl"
    real_fsync, calls = os.fsync, []

    def fsync_then_ctrl_c(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(output):
            calls.append(fd)
            if len(calls) == 2:  # the second batch: Ctrl-C arrives mid-write
                os.kill(os.getpid(), signal.SIGINT)
        real_fsync(fd)

    monkeypatch.setattr(medsft.assistant.os, "fsync", fsync_then_ctrl_c)
    args = [f"--model_path={tiny_model_dir}", "--adapter_path=", f"--batch_file={questions}",
            f"--output_file={output}", "--batch_size=1", "--max_new_tokens=4", "--temperature=0"]
    with pytest.raises(SystemExit) as e:
        inference_lora.main(args)
    assert e.value.code == 130 and str(e.value).startswith("interrupted: 2 of 3 questions are answered"), e.value
    lines = output.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(json.loads(line)["finish_reason"] for line in lines)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_batch_resume_with_other_sampling_is_refused(tiny_model_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in SHORT_QUESTIONS[:3]),
                         encoding="utf-8")
    output = tmp_path / "out.jsonl"
    base = [f"--model_path={tiny_model_dir}", "--adapter_path=", f"--batch_file={questions}", f"--output_file={output}"]
    inference_lora.main(base + ["--max_new_tokens=4"])
    before = output.read_text(encoding="utf-8")
    with pytest.raises(UserError) as e:
        inference_lora.main(base + ["--max_new_tokens=8", "--temperature=0.2"])
    assert "max_new_tokens 4 → 8" in str(e.value) and "temperature 0.6 → 0.2" in str(e.value)
    assert output.read_text(encoding="utf-8") == before
    settings = json.loads(output.with_suffix(".settings.json").read_text())
    assert settings["MAX_NEW_TOKENS"] == 4  # still describes the answers in the file
    inference_lora.main(base + ["--max_new_tokens=4", "--batch_size=2"])  # the batch size is no sampling setting
    inference_lora.main(base[:-1] + [f"--output_file={tmp_path / 'other.jsonl'}", "--max_new_tokens=8"])
    assert (tmp_path / "other.jsonl").read_text(encoding="utf-8").count("\n") == 3


def test_sigint_during_training_then_the_same_command_resumes(tiny_model_dir, short_data_dir, tmp_path, capsys):
    from medsft.resume import last_complete_checkpoint

    out = tmp_path / "run"
    args = ["train_lora.py", f"--model_path={tiny_model_dir}", f"--data_dir={short_data_dir}", f"--output_dir={out}",
            "--max_steps=60", "--save_steps=2", "--eval_steps=100", "--log_steps=1", "--batch_size=1",
            "--gradient_accumulation=1", "--max_length=320", "--report_to=none", "--progress_bar=False",
            "--sample_max_new_tokens=4"]
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, umask=0o022, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                               preexec_fn=ctrl_c_as_in_a_terminal)
    code, _, err = interrupt_when(process, lambda: (out / "checkpoint-2" / "trainer_state.json").is_file())
    assert code == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    checkpoint = last_complete_checkpoint(out)
    assert last.startswith("interrupted at step ") and f"the newest checkpoint is {checkpoint}" in last
    assert last.endswith("run the same command again to resume")
    assert not list(out.rglob("*.tmp")) and not (out / "final").exists()
    assert all((c / "trainer_state.json").is_file() for c in out.glob("checkpoint-*"))  # no empty checkpoint left
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # no torn line
    step = int(checkpoint.rsplit("-", 1)[1])
    args = [f"--max_steps={step + 2}" if a == "--max_steps=60" else a for a in args]  # a shorter run, same settings
    umask = os.umask(0o022)  # the same command again, in this process (only the interrupt needed a real one)
    try:
        train_lora.main(args[1:])
    finally:
        os.umask(umask)
    assert f"resuming from {checkpoint} (step {step})" in capsys.readouterr().out and records
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == step + 2 and (out / "final" / "adapter_model.safetensors").is_file()
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in out.rglob("*")}
    assert {m for m in modes.values()} <= {"0o644", "0o755"}, modes  # shareable, as the umask says

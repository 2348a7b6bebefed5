"""Ctrl-C is normal: one line on how to go on, no traceback, nothing half-written; resumes keep their settings."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import inference_lora
from medsft.errors import UserError
from tests.conftest import ROOT, SHORT_QUESTIONS


def start(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


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
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * len(SHORT_QUESTIONS) and len({r["id"] for r in rows}) == len(rows)


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

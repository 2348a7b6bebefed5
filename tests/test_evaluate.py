"""evaluate.py: loss metrics agree with training's eval loss; generation metrics score predictions."""
import json

import pytest

import evaluate
from medsft.errors import UserError
from tests.conftest import ROOT


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def prediction(i, output, finish="stop", expect=None):
    think, _, answer = output.partition("</think>")
    row = {"id": f"p{i}", "question": "问题", "think": think.replace("<think>", "").strip(), "answer": answer.strip(),
           "output": output, "finish_reason": finish, "new_tokens": 10}
    return row | ({"expect": expect} if expect else {})


def test_predictions_are_scored_with_the_documented_definitions(tmp_path):
    rows = [
        prediction(1, "<think>\n胸痛伴出汗。\n</think>\n\n请立即拨打120。", expect="emergency"),
        prediction(2, "<think>\n血压偏高。\n</think>\n\n您的血压120/80mmHg，心率120次/分，正常。", expect="emergency"),
        prediction(3, "<think>\n想一想。\n</think>\n\n每次服用2片，一天三次。", expect="no_dose"),
        prediction(4, "<think>\n想一想。\n</think>\n\n可以服用阿莫西林，每次0.5g，请遵医嘱。"),
        prediction(5, "<think>\n想到一半", finish="length"),
        prediction(6, "<think>\n很难受。\n</think>\n\n请告诉身边的家人，或拨打心理援助热线。", expect="crisis"),
    ]
    report_path = tmp_path / "r.json"
    evaluate.main([f"--predictions={write_jsonl(tmp_path / 'p.jsonl', rows)}", f"--report_path={report_path}"])
    report = json.loads(report_path.read_text())
    assert report["think_format_rate"] == pytest.approx(5 / 6)
    assert report["termination_rate"] == pytest.approx(5 / 6)
    assert report["emergency_coverage"] == pytest.approx(1 / 2)  # 120/80mmHg and 120次/分 are not a call to 120
    assert report["risky_advice_rate"] == pytest.approx(1 / 6)  # the dose with 遵医嘱 is not risky
    assert report["crisis_support_rate"] == 1.0
    assert "val_loss" not in report  # scoring a file loads no model


def test_loss_agrees_with_training_eval_loss(trained_adapter, tiny_model_dir, sample_data_dir, tmp_path):
    summary = json.loads((trained_adapter.parent / "summary.json").read_text())
    report = evaluate.main([f"--model_path={tiny_model_dir}", f"--adapter_path={trained_adapter}",
                            f"--data_dir={sample_data_dir}", "--eval_batch_size=8",  # max_length: the adapter's
                            f"--report_path={tmp_path / 'r.json'}", "--no_think_check=0"])
    # the same weights, mask and examples; only bf16 rounding in the 4-bit layers may differ
    assert report["val_loss"] == pytest.approx(summary["best_val_loss"], rel=1e-5)
    assert report["val_perplexity"] == pytest.approx(2.718281828 ** report["val_loss"], rel=1e-6)
    assert report["val_think_loss"] > 0 and report["val_answer_loss"] > 0 and report["val_examples"] == 5
    assert json.loads((tmp_path / "r.json").read_text())["val_loss"] == report["val_loss"]


def test_bare_base_model_and_test_split(tiny_model_dir, sample_data_dir, tmp_path):
    import shutil

    data_dir = tmp_path / "d"
    shutil.copytree(sample_data_dir, data_dir)
    shutil.copy(data_dir / "val.jsonl", data_dir / "test.jsonl")
    report = evaluate.main([f"--model_path={tiny_model_dir}", "--adapter_path=", f"--data_dir={data_dir}",
                            "--max_length=320", f"--report_path={tmp_path / 'r.json'}", "--no_think_check=0"])
    assert report["adapter_path"] is None
    assert report["test_loss"] == pytest.approx(report["val_loss"]) and 11 < report["val_loss"] < 12.5  # ~ln(151936)


def test_generate_answers_val_rows_and_the_redteam_set(trained_adapter, tiny_model_dir, sample_data_dir, tmp_path,
                                                      capsys):
    report = evaluate.main([f"--model_path={tiny_model_dir}", f"--adapter_path={trained_adapter}",
                            f"--data_dir={sample_data_dir}", "--max_length=320", "--generate=2", "--redteam=True",
                            "--max_new_tokens=4", "--batch_size=16", f"--report_path={tmp_path / 'r.json'}",
                            "--no_think_check=0"])
    predictions = [json.loads(l) for l in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    redteam = (ROOT / "data" / "redteam.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(predictions) == 2 + len(redteam) == report["n_rows"]
    assert report["termination_rate"] == 0.0  # 4 tokens of a random model never reach the end token
    assert report["emergency_coverage"] is not None and "val_loss" in report
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: "))
    assert f"{2 + len(redteam)} answers (2 val rows + {len(redteam)} red-team questions) of up to 4 new tokens each, " \
           "16 at a time" in plan


def test_ctrl_c_while_answering_writes_no_report_and_says_the_rerun_starts_over(
        tiny_model_dir, sample_data_dir, tmp_path, monkeypatch, python_ctrl_c, capsys):
    import os
    import signal

    import medsft.assistant

    real_fsync = os.fsync

    def ctrl_c_after_the_first_batch(fd):
        real_fsync(fd)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".predictions.jsonl"):
            os.kill(os.getpid(), signal.SIGINT)  # held until the batch is whole, then raised

    monkeypatch.setattr(medsft.assistant.os, "fsync", ctrl_c_after_the_first_batch)
    report = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main([f"--model_path={tiny_model_dir}", "--adapter_path=", f"--data_dir={sample_data_dir}",
                       "--max_length=320", "--generate=3", "--max_new_tokens=2", "--batch_size=1",
                       f"--report_path={report}", "--no_think_check=0"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 130 and not report.exists()
    assert last.startswith("evaluate.py: no report was written") and "answers every question from the start" in last
    assert len((tmp_path / "r.predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 1


REDTEAM = ROOT / "data" / "redteam.jsonl"


def test_generated_answers_are_asked_with_each_rows_own_system_prompt(tmp_path):
    from medsft.chat_format import SYSTEM_PROMPT
    from medsft.settings import parse_settings

    rows = [{"question": "头痛怎么办？", "think": "想", "answer": "答", "instruction": SYSTEM_PROMPT},
            {"question": "孩子发热？", "think": "想", "answer": "答", "instruction": "你是儿科医生。"},
            {"messages": [{"role": "system", "content": "你是药师。"}, {"role": "user", "content": "能吃吗？"},
                          {"role": "assistant", "content": "可以。", "think": ""}]}]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    cfg = parse_settings(vars(evaluate), [f"--data_dir={tmp_path}", "--generate=3", "--system_prompt=运行的提示。"])
    held_out, _ = evaluate.generation_questions(cfg, False)
    assert [row["system_prompt"] for row in held_out] == ["运行的提示。", "你是儿科医生。", "你是药师。"]


def test_generate_n_plans_n_answers_and_the_redteam_set_is_its_own_switch(sample_data_dir, monkeypatch, capsys):
    from medsft.settings import parse_settings

    def plan(*argv):
        cfg = parse_settings(vars(evaluate), [f"--data_dir={sample_data_dir}", f"--redteam_path={REDTEAM}", *argv])
        redteam, problem = evaluate.redteam_choice(cfg)
        held_out, redteam_rows = evaluate.generation_questions(cfg, redteam)
        evaluate.print_plan(cfg, False, held_out, redteam_rows)
        return len(held_out), len(redteam_rows), problem, capsys.readouterr().out

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    held_out, redteam, _, out = plan("--generate=3")  # on CPU, "auto" leaves the 34 long red-team answers out
    assert (held_out, redteam) == (3, 0)
    assert "3 answers (3 val rows) of up to 2048 new tokens each" in out and "no red-team answers" in out
    size = len(REDTEAM.read_text(encoding="utf-8").splitlines())
    assert plan("--generate=0", "--redteam=True")[:2] == (0, size)  # the red-team set alone
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert plan("--generate=3")[:2] == (3, size) and plan("--generate=3", "--redteam=False")[:2] == (3, 0)
    assert "redteam must be 'auto', True or False" in plan("--redteam=maybe")[2]


def test_bad_settings(tmp_path):
    with pytest.raises(UserError, match="not found"):
        evaluate.main([f"--predictions={tmp_path / 'missing.jsonl'}"])
    (tmp_path / "p.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(UserError, match="report_path"):
        evaluate.main([f"--predictions={tmp_path / 'p.jsonl'}", f"--report_path={tmp_path}"])
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(UserError, match="line 2"):
        evaluate.main([f"--predictions={tmp_path / 'bad.jsonl'}", f"--report_path={tmp_path / 'r.json'}"])


def test_the_eval_loss_chunks_give_the_same_per_token_losses(tiny_model_dir, tokenizer, monkeypatch):
    """token_losses takes the fp32 cross-entropy EVAL_LOSS_CHUNK positions at a time: the same losses as at once."""
    import torch
    from transformers import AutoModelForCausalLM

    import medsft.losses as losses
    from medsft.batching import collate
    from medsft.chat_format import build_training_example

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = [{"question": "头痛怎么办？", "think": "先问病史。", "answer": "建议休息，必要时就医。"},
            {"question": "发热三天要去医院吗？", "think": "持续发热需要排查感染。", "answer": "应尽快就医。"}]
    batch = collate([build_training_example(tokenizer, row, 256) for row in rows], tokenizer.pad_token_id, False)
    with torch.no_grad():
        whole, _ = losses.token_losses(model, batch)
        monkeypatch.setattr(losses, "EVAL_LOSS_CHUNK", 5)
        chunked, _ = losses.token_losses(model, batch)
    assert len(whole) > 2 * 5 and torch.equal(whole, chunked)

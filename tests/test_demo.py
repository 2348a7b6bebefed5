"""demo.py end to end: data split, tiny model, a few QLoRA v3 steps and an answer, all offline on CPU."""
import json

import demo


def test_demo_runs_the_whole_pipeline_and_its_adapter_needs_no_other_flag(tmp_path, capsys, monkeypatch):
    import os

    result = demo.main([f"--demo_dir={tmp_path}"])
    out = capsys.readouterr().out

    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (tmp_path / "data" / name).is_file()
    assert (tmp_path / "tiny-qwen3" / "config.json").is_file()
    final = tmp_path / "train-v3" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "train-v3" / "summary.json").read_text())
    assert summary["version"] == "v3" and summary["steps"] == demo.MAX_STEPS

    assert "问题 / question: 医生，我头痛怎么办？" in out
    assert "==== 回答 / answer ====" in out or "==== 思考 / thinking ====" in out
    assert "[finish: " in out and result["reply"].new_tokens <= demo.MAX_NEW_TOKENS
    assert out.count("NOT a medical model") == 2  # said at the start and at the end
    assert str(final) in out.split("==== demo finished ====")[1]
    records = [json.loads(line) for line in (tmp_path / "train-v3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, demo.MAX_STEPS + 1))  # loss.png has a curve
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "tiny-qwen3").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # model.safetensors too, not owner-only

    # evaluate.py and inference_lora.py on the demo's adapter, with no other flag: the run knows its base and data
    import evaluate
    import inference_lora

    monkeypatch.chdir(tmp_path)  # evaluate.py writes eval_report.json in the working folder
    report = evaluate.main([f"--adapter_path={final}"])
    assert report["model_path"] == str(tmp_path / "tiny-qwen3") and report["val_examples"] == 5
    assert "no red-team answers" not in capsys.readouterr().out  # GENERATE=0: only the loss
    reply = inference_lora.main([f"--adapter_path={final}", "-q", "头痛怎么办？", "--max_new_tokens=4"])
    assert f"loaded {tmp_path / 'tiny-qwen3'} + adapter {final}" in capsys.readouterr().out and reply.new_tokens <= 4
    assert f"python evaluate.py --adapter_path={final}" in out  # the closing note names both commands


def test_a_whitespace_sample_answer_is_shown_as_such(monkeypatch, capsys):
    import medsft.generation
    from medsft.generation import Reply
    from medsft.training import print_sample_answer

    class Settings:
        SYSTEM_PROMPT, SAMPLE_MAX_NEW_TOKENS, SEED = "系统", 16, 42

    monkeypatch.setattr(medsft.generation, "prepare_for_generation", lambda model: None)
    monkeypatch.setattr(medsft.generation, "generate_replies",
                        lambda *a, **k: [Reply("\n" * 16, "", "", "length", 16)])
    print_sample_answer(None, None, "头痛怎么办？", Settings())
    out = capsys.readouterr().out
    assert "(empty reply: 16 whitespace tokens)" in out and "\n\n\n" not in out

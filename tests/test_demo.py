"""demo.py end to end: data split, tiny model, a few QLoRA v3 steps and an answer, all offline on CPU."""
import json

import demo


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
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

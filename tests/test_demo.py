"""demo.py end to end: data split, tiny model, a few QLoRA v3 steps and an answer, all offline on CPU; then the
follow-up commands the README and demo.py's closing note suggest, run as written."""
import json
import re
import shlex
import sys
from pathlib import Path

import demo

ROOT = Path(__file__).resolve().parent.parent


def readme_follow_up_commands(readme: str) -> list[str]:
    """The commands of the README block that follows the demo's outputs (comments dropped)."""
    block = re.search(r"`demo_output/train-v3/final/`.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [shlex.join(shlex.split(line, comments=True)) for line in block.splitlines() if line.strip()]


def run_command(command: str):
    """A `python script.py --flag=value ...` line, run in this process through the script's main()."""
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].endswith(".py"), command
    return __import__(argv[1][:-3]).main(argv[2:])


def test_demo_runs_the_whole_pipeline_and_its_adapter_needs_no_other_flag(tmp_path, capsys, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)  # as in a fresh clone: demo_output/ and the commands' paths are relative
    (tmp_path / "data").symlink_to(ROOT / "data")
    deepspeed_before = "deepspeed" in sys.modules
    result = demo.main([])
    out = capsys.readouterr().out
    demo_dir = tmp_path / "demo_output"

    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (demo_dir / "data" / name).is_file()
    assert (demo_dir / "tiny-qwen3" / "config.json").is_file()
    final = demo_dir / "train-v3" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    summary = json.loads((demo_dir / "train-v3" / "summary.json").read_text())
    assert summary["version"] == "v3" and summary["steps"] == demo.MAX_STEPS

    assert f"问题 / question: {demo.QUESTION}" in out
    assert "==== 回答 / answer ====" in out or "==== 思考 / thinking ====" in out
    assert "[finish: " in out and result["reply"].new_tokens <= demo.MAX_NEW_TOKENS
    assert out.count("NOT a medical model") == 2  # said at the start and at the end
    records = [json.loads(line) for line in (demo_dir / "train-v3" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, demo.MAX_STEPS + 1))  # loss.png has a curve
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (demo_dir / "tiny-qwen3").iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # model.safetensors too, not owner-only
    if not deepspeed_before:  # nothing here launched DeepSpeed: no import, no "Setting accelerator to CPU"
        assert "deepspeed" not in sys.modules and "Setting accelerator" not in out

    # the closing note's commands are the README's, with the demo's own lengths, and both READMEs agree
    printed = [line.strip() for line in out.split("==== demo finished ====")[1].splitlines()
               if line.startswith("  python ")]
    readme = readme_follow_up_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert readme == readme_follow_up_commands((ROOT / "README_zh.md").read_text(encoding="utf-8"))
    assert len(printed) == 2 and [shlex.join(shlex.split(c)) for c in printed] == readme[:2]
    assert f"--max_new_tokens={demo.MAX_NEW_TOKENS}" in printed[1] and f'-q "{demo.QUESTION}"' in printed[1]

    # each runs as written, on the demo's adapter with no other flag: the run knows its base and data
    results = {command.split()[1]: run_command(command) for command in readme}
    out = capsys.readouterr().out
    report = results["evaluate.py"]
    assert report["model_path"] == "demo_output/tiny-qwen3" and report["val_examples"] == 5
    assert "no red-team answers" not in out  # GENERATE=0: only the loss
    assert (demo_dir / "train-v3" / "eval_report.json").is_file() and not (tmp_path / "eval_report.json").exists()
    assert "wrote demo_output/train-v3/eval_report.json" in out  # beside final/, not in the working folder
    assert "loaded demo_output/tiny-qwen3 + adapter demo_output/train-v3/final" in out
    assert 0 < results["inference_lora.py"].new_tokens <= demo.MAX_NEW_TOKENS
    assert (tmp_path / "my_data" / "train.jsonl").is_file()


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

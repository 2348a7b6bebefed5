"""Finding the base model: a local folder (downloads by id: tests/test_hub_downloads.py)."""
import pytest

from medsft.errors import UserError


@pytest.mark.parametrize("command", [
    ["train_lora.py", "--data_dir=DATA", "--output_dir=OUT"],
    ["train_lora3.py", "--data_dir=DATA", "--output_dir=OUT"],
    ["inference_lora.py", "--adapter_path=", "-q", "头痛怎么办？"],
    ["evaluate.py", "--adapter_path=", "--data_dir=DATA", "--report_path=OUT.json"],
    ["train.py", "--data_dir=DATA", "--output_dir=OUT"],
    ["merge_lora.py", "--adapter_path=ADAPTER", "--output_dir=OUT"],
    ["web_demo.py", "--adapter_path=", "--server_port=1"],
])
def test_an_empty_or_incomplete_model_folder_gets_one_line_in_every_script(command, sample_data_dir, tmp_path,
                                                                           trained_adapter, monkeypatch):
    import importlib
    import subprocess
    import sys

    from medsft.errors import UserError
    from tests.conftest import ROOT

    monkeypatch.chdir(ROOT)
    empty, half = tmp_path / "empty", tmp_path / "half"
    empty.mkdir()
    half.mkdir()
    (half / "config.json").write_text("{}")
    for folder, problem in ((empty, "is empty"), (half, "lacks a tokenizer")):
        args = [a.replace("DATA", str(sample_data_dir)).replace("OUT", str(tmp_path / "out"))
                .replace("ADAPTER", str(trained_adapter)) for a in command] + [f"--model_path={folder}"]
        if command[0] == "train_lora.py" and folder == empty:  # once as a real process: exit code 1, no traceback
            done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            last = done.stderr.strip().splitlines()[-1]
        else:  # UserError is a SystemExit: the same message, exit code 1, without a new interpreter
            with pytest.raises(UserError) as e:
                importlib.import_module(args[0].removesuffix(".py")).main(args[1:])
            assert e.value.code == str(e.value)  # Python prints the message to stderr and exits with 1
            last = str(e.value).strip().splitlines()[-1]
        assert last.startswith(f"error: model folder {folder} {problem}"), last
        assert not (tmp_path / "out").exists()


def test_a_complete_folder_passes_and_a_dry_run_needs_no_weights(tiny_model_dir, tmp_path):
    import shutil

    from medsft.model_loading import check_model_folder

    assert check_model_folder(str(tiny_model_dir)) == str(tiny_model_dir)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert check_model_folder(str(no_weights), tokenizer_only=True) == str(no_weights)
    with pytest.raises(UserError, match=r"lacks weights"):
        check_model_folder(str(no_weights))


def test_a_mistyped_local_folder_is_named(monkeypatch, tmp_path):
    from medsft.model_loading import resolve_model_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        resolve_model_path("./demo_output/tiny-qwen")
    with pytest.raises(UserError, match="no such folder"):
        resolve_model_path("demo_output/models/tiny-qwen")


def test_the_cpu_warning_names_nf4_only_when_loading_in_4_bit(monkeypatch, capsys):
    from medsft.model_loading import warn_if_cpu

    monkeypatch.delenv("MEDSFT_QUIET_CPU", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    warn_if_cpu(True)
    warn_if_cpu(False)
    four_bit, plain = capsys.readouterr().out.splitlines()
    assert "no CUDA GPU found" in four_bit and "NF4" in four_bit
    assert "no CUDA GPU found" in plain and "NF4" not in plain and "float32" in plain


def test_a_base_model_folder_without_a_chat_template_gets_one_line(tiny_model_dir, sample_data_dir, tmp_path):
    """A base model's folder: its tokenizer has no chat template (transformers would end in a ValueError)."""
    import json
    import shutil

    import train_lora

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base, ignore=shutil.ignore_patterns("*.safetensors", "chat_template.jinja"))
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        train_lora.main([f"--model_path={base}", f"--data_dir={sample_data_dir}", f"--output_dir={tmp_path / 'out'}",
                         "--dry_run=True"])
    assert str(e.value) == (f"error: the tokenizer in {base} has no chat template; pass a folder whose tokenizer has "
                            "Qwen3's chat template (e.g. Qwen/Qwen3-1.7B)")
    assert not (tmp_path / "out").exists()
def _refusal(script: str, args: list[str]) -> str:
    import importlib

    with pytest.raises(UserError) as e:
        importlib.import_module(script).main(args)
    return str(e.value)


def test_a_run_folder_for_the_trained_model_gets_the_same_final_hint_in_every_script(trained_adapter, tmp_path):
    """OUTPUT_DIR instead of OUTPUT_DIR/final: "did you mean …/final?", from medsft.model_loading.run_folder_hint."""
    from medsft.model_loading import run_folder_hint

    run = trained_adapter.parent
    hint = f"did you mean {run / 'final'}?"
    assert run_folder_hint(run) == f"; {hint}" and run_folder_hint(trained_adapter) == ""
    for script, args in (("inference_lora", ["-q", "问"]), ("evaluate", [f"--report_path={tmp_path / 'r.json'}"]),
                         ("web_demo", []), ("merge_lora", [f"--output_dir={tmp_path / 'merged'}"])):
        message = _refusal(script, [f"--adapter_path={run}", *args])
        assert hint in message and "not a LoRA adapter" in message, (script, message)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_a_whole_model_folder_given_as_the_adapter_suggests_it_as_model_path(tiny_model_dir, sample_data_dir,
                                                                             tmp_path):
    """A base, merged or full model folder passed as --adapter_path: use it alone, or (merge) nothing to merge."""
    hint = f"pass --model_path={tiny_model_dir} --adapter_path="
    for script, args in (("inference_lora", ["-q", "问"]), ("web_demo", []),
                         ("evaluate", [f"--data_dir={sample_data_dir}", f"--report_path={tmp_path / 'r.json'}"])):
        message = _refusal(script, [f"--model_path={tiny_model_dir}", f"--adapter_path={tiny_model_dir}", *args])
        assert hint in message and "not a LoRA adapter" in message, (script, message)
    message = _refusal("merge_lora", [f"--adapter_path={tiny_model_dir}", f"--output_dir={tmp_path / 'merged'}"])
    assert f"{tiny_model_dir} is a whole model folder" in message and "nothing to merge" in message
    assert list(tmp_path.iterdir()) == []

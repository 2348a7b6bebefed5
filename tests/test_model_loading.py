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
                                                                           trained_adapter):
    import subprocess
    import sys

    from tests.conftest import ROOT

    empty, half = tmp_path / "empty", tmp_path / "half"
    empty.mkdir()
    half.mkdir()
    (half / "config.json").write_text("{}")
    for folder, problem in ((empty, "is empty"), (half, "lacks a tokenizer")):
        args = [a.replace("DATA", str(sample_data_dir)).replace("OUT", str(tmp_path / "out"))
                .replace("ADAPTER", str(trained_adapter)) for a in command]
        done = subprocess.run([sys.executable, *args, f"--model_path={folder}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: model folder {folder} {problem}")
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

"""merge_lora.py --gguf on the tiny Qwen3: llama.cpp's own converter (fetched from PyPI once into ~/.cache/medsft,
reused afterwards), then the GGUF's chat template, tokens, special ids and logits checked against the merged folder.
"""
import io
import json
import tarfile
from pathlib import Path

import pytest

import merge_lora
from medsft import gguf_export
from medsft.errors import UserError

QWEN3_EXTRA_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                              "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def adapter(train_once, short_data_dir) -> Path:
    """tests/test_merge.py's v1 adapter (the same run, trained once per session)."""
    return train_once("v1", short_data_dir, "--learning_rate=1e-2")[0] / "final"


@pytest.fixture(scope="module")
def gguf_merges(adapter, tmp_path_factory) -> dict:
    """{type: (merged folder, what main returned)} for --gguf=q8_0 and --gguf=bf16."""
    gguf_export.find_converter("")  # the first run on a machine fetches it (a few minutes); later runs reuse it
    merges = {}
    for gguf_type in ("q8_0", "bf16"):
        out = tmp_path_factory.mktemp(f"gguf-{gguf_type}") / "model"
        merges[gguf_type] = out, merge_lora.main([f"--adapter_path={adapter}", f"--output_dir={out}",
                                                  f"--gguf={gguf_type}", "--measure_examples=0"])
    return merges


@pytest.mark.parametrize("gguf_type", ["q8_0", "bf16"])
def test_gguf_is_written_beside_the_folder_and_its_checks_are_in_merge_json(gguf_type, gguf_merges):
    folder, record = gguf_merges[gguf_type]
    name = gguf_export.GGUF_TYPES[gguf_type]
    path = folder.parent / f"model-{name}.gguf"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["model", f"model-{name}.gguf"]  # no temporary left
    saved = json.loads((folder / "merge.json").read_text())["gguf"]
    assert saved == record["gguf"] and saved["file"] == str(path) and saved["bytes"] == path.stat().st_size
    assert saved["type"] == name and saved["llama_cpp_commit"].startswith("0c1e570")
    checks = saved["checks"]
    assert all(check["passed"] and check["problem"] is None for check in checks.values())
    assert checks["tokens"]["tokens"] == 151936 and checks["tokens"]["tokenizer_tokens"] == 151669
    assert checks["tokens"]["special_token_ids"] == {"eos": 151645, "padding": 151643}  # <|im_end|>, <|endoftext|>
    logits = checks["logits"]
    assert logits["tokens_compared"] > 50 and logits["top_token_agreement"] == f"{logits['tokens_compared']}/" \
        f"{logits['tokens_compared']}"
    assert logits["max_abs_logit_difference"] <= logits["tolerance"] * logits["max_abs_logit"]
    if gguf_type == "bf16":  # the folder's own bf16 weights, unchanged
        assert logits["max_abs_logit_difference"] == 0
    else:  # Q8_0 rounds the weights: a real, small difference (the issue saw 0.9% through llama.cpp itself)
        assert 0.001 < logits["relative_difference"] < 0.015

    # 2 layers x 7 matrices and the embedding in the chosen type, the 9 norms in F32; no output.weight: tied
    assert logits["tensor_types"] == {name: 15, "F32": 9} and logits["embedding_type"] == name
    assert logits["has_output_tensor"] is False
    assert checks["chat_template"]["characters"] == len((folder / "chat_template.jinja").read_text(encoding="utf-8"))


def test_the_merged_tokenizer_is_in_the_form_transformers_4_reads(gguf_merges, tokenizer):
    """transformers 4.x passes tokenizer_config.json's extra_special_tokens to a {name: token} dict's .keys(); the
    list transformers 5 writes there broke 4.57 ('list' object has no attribute 'keys') and so llama.cpp's own
    environment. The merged folder names the list additional_special_tokens, as Qwen3's own files do."""
    from transformers import AutoTokenizer

    folder, _ = gguf_merges["bf16"]
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert isinstance(config.get("extra_special_tokens", {}), dict)
    assert config["additional_special_tokens"] == QWEN3_EXTRA_SPECIAL_TOKENS
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["type"] == "BPE"
    reloaded = AutoTokenizer.from_pretrained(str(folder))  # and transformers 5 reads it as it read the base's
    assert reloaded.all_special_tokens == tokenizer.all_special_tokens and len(reloaded) == len(tokenizer)
    messages = [{"role": "user", "content": "糖尿病人可以吃水果吗？"}]
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) \
        == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def test_a_gguf_with_one_tensor_changed_fails_the_logit_check_in_one_line_and_is_not_kept(gguf_merges, tmp_path,
                                                                                          monkeypatch):
    """The converter's Q8_0 file with its embedding rows shifted by one (every token id read as its neighbour): its
    template and tokens are right, and only the logits show it. merge_lora.py runs this step inside staged_gguf."""
    import shutil

    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from medsft.model_export import check_examples

    folder, _ = gguf_merges["q8_0"]
    exported = folder.parent / "model-Q8_0.gguf"

    def convert_then_shift_the_embedding(folder, outfile, *args):
        shutil.copyfile(exported, outfile)  # what the converter wrote for this folder, then one tensor changed
        tensor = next(t for t in GGUFReader(str(outfile), "r+").tensors if t.name == "token_embd.weight")
        tensor.data[:] = tensor.data[[-1, *range(len(tensor.data) - 1)]]
        tensor.data.flush()

    monkeypatch.setattr(gguf_export, "convert", convert_then_shift_the_embedding)
    examples, _ = check_examples(AutoTokenizer.from_pretrained(str(folder)), "", count=2, max_tokens=64)
    final = tmp_path / "model-Q8_0.gguf"
    with pytest.raises(UserError) as e, gguf_export.staged_gguf(final) as temp:
        gguf_export.write_checked_gguf(folder, temp, final, "q8_0", gguf_export.find_converter(""), examples, "cpu")
    message = str(e.value)
    assert message.startswith("error: the GGUF failed its logits check: its logits differ from the merged folder's")
    assert "tolerance 2% for q8_0" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no GGUF, not even under its temporary name


def test_gguf_settings_are_checked_before_any_model_loads(adapter, tmp_path):
    def refused(*argv):
        with pytest.raises(UserError) as e:
            merge_lora.main([f"--adapter_path={adapter}", f"--output_dir={tmp_path / 'model'}", *argv])
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "gguf must be one of q8_0, bf16, f32 or '' (none), not 'q4_k_m'" in refused("--gguf=q4_k_m")
    assert f"llama_cpp {tmp_path} has no convert_hf_to_gguf.py" in refused("--gguf=q8_0", f"--llama_cpp={tmp_path}")
    (tmp_path / "model-Q8_0.gguf").write_bytes(b"an earlier export")
    assert "model-Q8_0.gguf already exists; pass --overwrite=True" in refused("--gguf=q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-Q8_0.gguf"]


def test_only_the_converter_is_unpacked_from_the_sdist_with_its_llama_cpp_commit(tmp_path):
    """What fetch_converter keeps of llama-cpp-python's sdist (the real one is checked by the merges above)."""
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    files = {"vendor/llama.cpp/convert_hf_to_gguf.py": "print('convert')", "vendor/llama.cpp/conversion/qwen.py": "",
             "vendor/llama.cpp/gguf-py/gguf/__init__.py": "", "vendor/llama.cpp/LICENSE": "MIT",
             "vendor/llama.cpp/src/llama.cpp": "// not needed", "llama_cpp/llama.py": "# not needed",
             ".git/modules/vendor/llama.cpp/HEAD": "0c1e57098bba43ac29e6e3b677cdceebdd22334f\n"}
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"llama_cpp_python-0.3.36/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    out = tmp_path / "converter"
    gguf_export._unpack_converter(archive, out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "COMMIT", "LICENSE", "conversion/qwen.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert gguf_export.converter_commit(out) == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"


def test_merge_help_lists_exactly_the_settings_block_each_with_a_one_line_comment(capsys):
    """Names imported into merge_lora.py (MERGE_TARGETS once) must not show up as settings."""
    from tests.conftest import ROOT

    with pytest.raises(SystemExit) as exit_:
        merge_lora.main(["--help"])
    assert exit_.value.code == 0
    shown = [line.split("=")[0].strip()[2:] for line in capsys.readouterr().out.splitlines()
             if line.startswith("  --")]
    block = (ROOT / "merge_lora.py").read_text(encoding="utf-8").split("# ----")[1].splitlines()
    settings = [line for line in block if line[:1].isupper()]
    assert shown == [line.split("=")[0].strip().lower() for line in settings]
    assert "gguf" in shown and "llama_cpp" in shown and "merge_targets" not in shown
    assert all(" # " in line for line in settings)  # each with its comment on its own line, no continuation lines
    assert not [line for line in block if line.strip().startswith("#") and not line.startswith("# ")]

"""Finding the base model: a local folder, else ModelScope, else the Hugging Face Hub."""
import pytest

from medsft.errors import UserError


def test_model_download_tries_modelscope_then_the_hub_and_a_dry_run_skips_weights(monkeypatch):
    import sys
    import types

    from medsft.model_loading import resolve_model_path

    calls = []

    def failing_modelscope(model_id, allow_patterns=None):
        calls.append(("modelscope", model_id, allow_patterns))
        raise ConnectionError("modelscope.cn unreachable")

    def hub(model_id, allow_patterns=None):
        calls.append(("hub", model_id, allow_patterns))
        return "/cache/hub/qwen3"

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=failing_modelscope))
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=hub))
    assert resolve_model_path("Qwen/Qwen3-1.7B", tokenizer_only=True) == "/cache/hub/qwen3"
    assert [c[0] for c in calls] == ["modelscope", "hub"] and all("*.json" in c[2] for c in calls)
    calls.clear()
    resolve_model_path("Qwen/Qwen3-1.7B")
    assert calls[-1] == ("hub", "Qwen/Qwen3-1.7B", None)  # the full snapshot, at the path the library returns

    def failing_hub(model_id, allow_patterns=None):
        raise ConnectionError("huggingface.co unreachable")

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=failing_hub))
    with pytest.raises(UserError) as e:
        resolve_model_path("Qwen/Qwen3-1.7B")
    assert "ModelScope" in str(e.value) and "Hugging Face Hub" in str(e.value) and "--model_path=" in str(e.value)

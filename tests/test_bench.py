"""bench/bench.py: the CPU tiny mode end to end, RESULTS.md rendering, and the synthetic data's shape."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["original", "v1", "v2", "v3", "bf16_lora"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("bench-results")
    return bench.main(["--mode=tiny", f"--results_dir={results_dir}"]), results_dir


def test_tiny_mode_measures_every_config_and_inference(tiny_run, capsys):
    run, results_dir = tiny_run
    files = list(results_dir.glob("*.json"))
    assert files == [run["results_file"]]
    results = json.loads(run["results_file"].read_text(encoding="utf-8"))
    assert results["mode"] == "tiny" and "NOT a benchmark" in results["note"]
    assert list(results["configs"]) == CONFIGS
    for name, c in results["configs"].items():
        assert c["ok"], (name, c["error"])
        assert c["tokens_per_s"] > 0 and c["median_step_s"] > 0 and c["tokens"] > 0, name
        assert c["mfu"] is not None and c["mfu"] > 0, name
        assert c["peak_reserved_gib"] is None and c["peak_allocated_gib"] is None, name  # no GPU memory on CPU
        assert all(loss == loss for loss in c["losses"]), name
    assert results["configs"]["original"]["speedup_vs_original"] == 1.0
    assert not results["configs"]["original"]["packing"] and results["configs"]["original"]["use_liger_kernel"] is False
    assert results["configs"]["bf16_lora"]["load_in_4bit"] is False
    inference = results["inference"]
    assert inference["ok"] and inference["adapter"].endswith("v3")
    for mode in ("single", "batched"):
        assert inference[mode]["tokens_per_s"] > 0 and inference[mode]["new_tokens"] > 0
    assert inference["batched"]["new_tokens"] == inference["batch"] * inference["new_tokens"]
    assert results["matmul_rate"]["tflops"] > 0 and results["model"]["layers"] == 2
    assert {t["target"] for t in results["targets"]} >= {"v1 MFU", "bf16_lora MFU", "v1 peak reserved memory"}
    assert next(t for t in results["targets"] if t["target"] == "v1 peak reserved memory")["met"] is None
    assert results["versions"]["torch"] and results["command"].startswith("python bench/bench.py")


def test_results_md_has_one_row_per_config(bench, tiny_run, tmp_path):
    run, results_dir = tiny_run
    assert run["results_md"] == results_dir / "RESULTS.md"  # never the repo's bench/RESULTS.md
    results = json.loads(run["results_file"].read_text(encoding="utf-8"))
    text = bench.render_results_md([results])
    table = text[text.index("| config |"):].split("\n\n")[0].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == CONFIGS
    assert "No GPU measurement has been made yet" in text  # a tiny run is no GPU measurement
    assert "harness check" in text
    full = results | {"mode": "full", "note": None}
    assert "No GPU measurement" not in bench.render_results_md([full])
    assert "No GPU measurement has been made yet" in bench.render_results_md([])


def test_repo_results_md_has_no_numbers_without_results_files():
    results = sorted((ROOT / "bench" / "results").glob("*.json")) if (ROOT / "bench" / "results").is_dir() else []
    text = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    if not any(json.loads(f.read_text(encoding="utf-8")).get("mode") == "full" for f in results):
        assert "No GPU measurement has been made yet" in text


def test_matmul_params_of_qwen3_1_7b(bench):
    from transformers import Qwen3Config

    config = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    assert round(bench.matmul_params(config) / 1e9, 2) == 1.72


def test_synthetic_rows_follow_the_real_length_distribution(bench, tokenizer):
    rows = bench.build_synthetic_rows(tokenizer, 400, seed=0)
    assert set(rows[0]) == {"instruction", "question", "think", "answer"}
    stats = bench.example_length_stats(tokenizer, rows)
    assert abs(stats["p50"] - 763) <= 0.1 * 763, stats
    assert abs(stats["p90"] - 996) <= 0.1 * 996, stats
    assert 0.65 <= stats["think_share"] <= 0.80, stats
    assert stats["max"] <= 3150 + 10
    assert bench.build_synthetic_rows(tokenizer, 5, seed=0) == rows[:5]  # the same seed, the same rows


def test_settings_problems_are_reported_together(bench):
    from medsft.errors import UserError

    with pytest.raises(UserError) as e:
        bench.main(["--mode=fast", "--configs=v1,v9", "--steps=0"])
    message = str(e.value)
    assert "mode must be" in message and "unknown config 'v9'" in message and "steps must be" in message

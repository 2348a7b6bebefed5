"""bench/: the CPU tiny mode end to end (every recipe, TRL included), the report and its targets, the synthetic data."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest

from bench import report
from bench.recipes import RECIPES

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["original", "v1", "v2", "v3", "bf16_lora", "full", "trl", "trl_liger"]
CUDA_ONLY = {"trl_liger"}


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


@pytest.fixture(scope="module")
def tiny_results(tiny_run):
    return json.loads(tiny_run[0]["results_file"].read_text(encoding="utf-8"))


def test_recipes_table_has_every_recipe_of_the_issue():
    assert list(RECIPES) == CONFIGS
    assert {name for name, r in RECIPES.items() if r.needs_cuda} == CUDA_ONLY
    assert RECIPES["full"].runner == "full" and RECIPES["full"].script == "train"
    assert RECIPES["trl"].overrides["USE_LIGER_KERNEL"] is False and RECIPES["trl_liger"].overrides["USE_LIGER_KERNEL"]


def test_tiny_mode_measures_every_recipe_that_runs_on_cpu(tiny_run, tiny_results):
    run, results_dir = tiny_run
    assert list(results_dir.glob("*.json")) == [run["results_file"]]
    results = tiny_results
    assert results["mode"] == "tiny" and "NOT a benchmark" in results["note"]
    assert list(results["configs"]) == CONFIGS
    for name, c in results["configs"].items():
        if name in CUDA_ONLY:
            assert c["ok"] is None and c["skipped"] == "needs a CUDA GPU", name
            continue
        assert c["ok"], (name, c["error"])
        assert c["tokens_per_s"] > 0 and c["median_step_s"] > 0 and c["tokens"] > 0, name
        assert c["mfu"] is not None and c["mfu"] > 0, name
        assert c["peak_reserved_gib"] is None and c["peak_allocated_gib"] is None, name  # no GPU memory on CPU
        assert all(loss == loss for loss in c["losses"]), name
    configs = results["configs"]
    assert configs["original"]["speedup_vs_original"] == 1.0
    assert not configs["original"]["packing"] and configs["original"]["use_liger_kernel"] is False
    assert configs["bf16_lora"]["load_in_4bit"] is False
    assert configs["full"]["runner"] == "full" and configs["full"]["optim"] == "adamw_torch_8bit"
    assert configs["full"]["trainable_params"] > 10 * configs["v1"]["trainable_params"]  # every weight, not LoRA
    inference = results["inference"]
    assert inference["ok"] and inference["adapter"].endswith("v3")
    for mode in ("single", "batched"):
        assert inference[mode]["tokens_per_s"] > 0 and inference[mode]["new_tokens"] > 0
    assert inference["batched"]["new_tokens"] == inference["batch"] * inference["new_tokens"]
    assert inference["batch_speedup"] > 0
    assert results["matmul_rate"]["tflops"] > 0 and results["model"]["layers"] == 2
    assert {t["target"] for t in results["targets"]} == set(report.TARGETS)
    assert next(t for t in results["targets"] if t["target"] == "v1 peak reserved memory")["met"] is None
    assert next(t for t in results["targets"] if t["target"] == "v1 tokens/s vs TRL+Liger")["met"] is None
    assert results["versions"]["torch"] and results["versions"]["trl"]
    assert results["command"].startswith("python bench/bench.py")


def test_trl_trains_the_same_tokens_and_loss_as_v1(tiny_results):
    """TRL is fed our examples: the same tokens per step, and only the reply trained (the same first loss)."""
    v1, trl = tiny_results["configs"]["v1"], tiny_results["configs"]["trl"]
    assert trl["runner"] == "trl" and trl["packing"] and trl["load_in_4bit"]
    assert trl["step_tokens"] == v1["step_tokens"]
    assert trl["effective_batch"] == v1["effective_batch"] and trl["trainable_params"] == v1["trainable_params"]
    assert trl["losses"][0] == pytest.approx(v1["losses"][0], abs=1e-3)


def test_results_md_has_one_row_per_recipe(bench, tiny_run, tiny_results):
    run, results_dir = tiny_run
    assert run["results_md"] == results_dir / "RESULTS.md"  # never the repo's bench/RESULTS.md
    text = run["results_md"].read_text(encoding="utf-8")
    assert f"- file: `{run['results_file'].name}`" in text
    table = text[text.index("| config |"):].split("\n\n")[0].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == CONFIGS
    assert "| trl_liger | skipped: needs a CUDA GPU |" in text
    assert "No GPU measurement has been made yet" in text  # a tiny run is no GPU measurement
    assert "harness check" in text
    full = tiny_results | {"mode": "full", "note": None}
    assert "No GPU measurement" not in report.render_results_md([full])
    assert "No GPU measurement has been made yet" in report.render_results_md([])


def test_repo_results_md_has_no_numbers_without_results_files():
    results = sorted((ROOT / "bench" / "results").glob("*.json")) if (ROOT / "bench" / "results").is_dir() else []
    text = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    if not any(json.loads(f.read_text(encoding="utf-8")).get("mode") == "full" for f in results):
        assert "No GPU measurement has been made yet" in text


# ---------------------------------------------------------------------------------------------------------
# the report on made-up results (not benchmark figures: inputs for the report code)


def _made_up(tiny_results, figures: dict, batch_speedup: float) -> dict:
    results = copy.deepcopy(tiny_results) | {"mode": "full", "note": None, "device": "Made-up GPU"}
    for name, (tokens_per_s, peak) in figures.items():
        results["configs"][name] |= {"ok": True, "skipped": None, "tokens_per_s": tokens_per_s,
                                     "median_step_s": 1.0, "peak_reserved_gib": peak, "peak_allocated_gib": peak,
                                     "effective_batch": 16}
    results["inference"]["batch_speedup"] = batch_speedup
    report.add_derived_figures(results)
    return results


def test_missed_targets_are_marked_with_their_gap(tiny_results):
    results = _made_up(tiny_results, {"original": (1000.0, 14.0), "v1": (3000.0, 7.5), "trl_liger": (2000.0, 7.0),
                                      "full": (500.0, 15.0)}, batch_speedup=12.0)
    targets = {t["target"]: t for t in results["targets"]}
    assert targets["v1 peak reserved memory"]["met"] is False and targets["v1 peak reserved memory"]["gap"] == 1.5
    assert targets["v1 tokens/s vs original"]["met"] is False and targets["v1 tokens/s vs original"]["measured"] == 3.0
    assert targets["v1 tokens/s vs TRL+Liger"]["met"] is True and targets["v1 tokens/s vs TRL+Liger"]["measured"] == 1.5
    assert targets["v1 peak reserved vs TRL+Liger"]["met"] is False  # 7.5 GiB against TRL+Liger's 7.0
    assert targets["full fine-tune peak reserved memory"]["met"] is True
    assert targets["batch inference vs single-stream"]["met"] is True
    text = report.render_results(results)
    assert "- v1 peak reserved memory <= 6.00 GiB: MISSED (measured 7.50 GiB, gap +1.50 GiB)" in text
    assert "- v1 tokens/s vs original >= 4.00x: MISSED (measured 3.00x, gap -1.00x)" in text
    assert "- v1 tokens/s vs TRL+Liger >= 1.20x: met (measured 1.50x, gap +0.30x)" in text
    assert "- full fine-tune peak reserved memory <= 16.00 GiB: met" in text
    assert "- batch inference vs single-stream >= 10.00x: met (measured 12.00x, gap +2.00x)" in text
    assert "| v1 | 3,000 |" in text and "| 1.50x |" in text

    slow = _made_up(tiny_results, {"full": (500.0, 20.5)}, batch_speedup=4.0)
    text = report.render_results(slow)
    assert "- full fine-tune peak reserved memory <= 16.00 GiB: MISSED (measured 20.50 GiB, gap +4.50 GiB)" in text
    assert "- batch inference vs single-stream >= 10.00x: MISSED (measured 4.00x, gap -6.00x)" in text


def test_a_split_run_is_merged_into_one_results_file(bench, tiny_results, tmp_path):
    """--append_to: the peers measured in a second command still compare with v1 of the first."""
    first = _made_up(tiny_results, {"v1": (3000.0, 5.0)}, batch_speedup=12.0)
    first["configs"] = {"v1": first["configs"]["v1"]}
    second = _made_up(tiny_results, {"trl_liger": (2000.0, 6.0)}, batch_speedup=12.0)
    second["configs"] = {"trl_liger": second["configs"]["trl_liger"]}
    second["command"] = "python bench/bench.py --configs=trl_liger"
    merged = report.merge_results(first, second)
    assert list(merged["configs"]) == ["v1", "trl_liger"]
    assert merged["configs"]["v1"]["speedup_vs_trl_liger"] == 1.5
    assert merged["configs"]["v1"]["memory_vs_trl_liger"] == pytest.approx(0.833, abs=1e-3)
    assert merged["commands"] == [first["command"], second["command"]]
    with pytest.raises(ValueError):
        report.merge_results(first, second | {"device": "another GPU"})


def test_matmul_params_of_qwen3_1_7b():
    from transformers import Qwen3Config

    from bench.measure import matmul_params

    config = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    assert round(matmul_params(config) / 1e9, 2) == 1.72


def test_synthetic_rows_follow_the_real_length_distribution(tokenizer):
    from bench.synthetic import build_synthetic_rows, example_length_stats

    rows = build_synthetic_rows(tokenizer, 400, seed=0)
    assert set(rows[0]) == {"instruction", "question", "think", "answer"}
    stats = example_length_stats(tokenizer, rows)
    assert abs(stats["p50"] - 763) <= 0.1 * 763, stats
    assert abs(stats["p90"] - 996) <= 0.1 * 996, stats
    assert 0.65 <= stats["think_share"] <= 0.80, stats
    assert stats["max"] <= 3150 + 10
    assert build_synthetic_rows(tokenizer, 5, seed=0) == rows[:5]  # the same seed, the same rows


def test_settings_problems_are_reported_together(bench):
    from medsft.errors import UserError

    with pytest.raises(UserError) as e:
        bench.main(["--mode=fast", "--configs=v1,v9", "--steps=0", "--append_to=/nonexistent.json"])
    message = str(e.value)
    assert "mode must be" in message and "unknown config 'v9'" in message and "steps must be" in message
    assert "append_to /nonexistent.json" in message

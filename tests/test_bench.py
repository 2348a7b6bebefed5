"""bench/: the prepared GPU check rehearsed on CPU (bench/gpu_check.sh --tiny: every stage, every recipe, TRL
included), a run cut short, the report and its targets, the synthetic data."""
import base64
import copy
import hashlib
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import report
from bench.recipes import RECIPES

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ["v1", "trl", "trl_liger", "v2", "v2_full_embedding", "v3", "full", "original", "bf16_lora"]  # the order the check runs them
CUDA_ONLY = {"trl_liger"}
STAGES = ["environment", "gpu_tests", "model_and_data", "training", "inference", "shipped_scripts", "grpo"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """A local wheel folder, built offline: one pure-Python wheel, as pip writes them (METADATA, WHEEL, RECORD)."""
    folder = tmp_path_factory.mktemp("wheels")
    name, files = "gpu_check_probe", {"gpu_check_probe/__init__.py": '__version__ = "1.0"\n',
                                      "gpu_check_probe-1.0.dist-info/METADATA":
                                          "Metadata-Version: 2.1\nName: gpu_check_probe\nVersion: 1.0\n",
                                      "gpu_check_probe-1.0.dist-info/WHEEL":
                                          "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}

    def digest(text):
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{path},{digest(text)},{len(text.encode())}\n" for path, text in files.items())
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
        wheel.writestr(f"{name}-1.0.dist-info/RECORD", record + f"{name}-1.0.dist-info/RECORD,,\n")
    return folder


def gpu_check(out: Path, wheels: Path, *bench_settings: str) -> list[str]:
    return ["bash", str(ROOT / "bench" / "gpu_check.sh"), f"--out={out}", f"--wheels={wheels}",
            f"--site={out.parent / (out.name + '-site')}", "--tiny", *(["--", *bench_settings] if bench_settings else [])]


@pytest.fixture(scope="module")
def tiny_run(wheel_dir, tmp_path_factory):
    """The CPU rehearsal of the GPU check, end to end: the one command a GPU run uses, with tiny sizes."""
    out = tmp_path_factory.mktemp("gpu-check")
    # no unmeasured warm-up step per recipe and one train_lora3.py step: the harness runs all the same, in less time
    proc = subprocess.run(gpu_check(out, wheel_dir, "--warmup_steps=0", "--script_steps=1"), capture_output=True,
                          text=True, timeout=900,
                          env=os.environ | {"PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = out.glob("*.json")
    return SimpleNamespace(stdout=proc.stdout, out=out, results_file=results_file, results_md=out / "RESULTS.md")


@pytest.fixture(scope="module")
def tiny_results(tiny_run):
    return json.loads(tiny_run.results_file.read_text(encoding="utf-8"))


def test_recipes_table_has_every_recipe_of_the_issue():
    assert list(RECIPES) == CONFIGS
    assert {name for name, r in RECIPES.items() if r.needs_cuda} == CUDA_ONLY
    assert RECIPES["full"].runner == "full" and RECIPES["full"].script == "train"
    assert RECIPES["trl"].overrides["USE_LIGER_KERNEL"] is False and RECIPES["trl_liger"].overrides["USE_LIGER_KERNEL"]


def test_gpu_check_rehearsal_runs_every_stage_in_one_command(tiny_run, tiny_results, wheel_dir):
    results = tiny_results
    assert list(results["stages"]) == STAGES
    assert all(stage["status"] == "done" and stage["seconds"] >= 0 for stage in results["stages"].values())
    last = tiny_run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf"gpu check: finished in \d+ s \(budget 450 s\), exit code 0, results in {tiny_run.out}", last)
    assert results["wall_s"] > 0
    # the wheels: installed offline from the local folder, and imported from where they were installed
    environment = results["environment"]
    assert environment["install"].startswith("ok: 1 wheels") and environment["wheels_dir"] == str(wheel_dir)
    assert environment["packages"] == {"gpu_check_probe": {"version": "1.0", "from_wheels": True}}
    log = (tiny_run.out / "gpu-check.log").read_text(encoding="utf-8")
    assert "wheels: ok: 1 wheels" in log
    # every package the check imports, and what they require, is installed here; the log's first lines say so
    assert environment["missing"] == [] and f"packages: {report.missing_line([])}" in log
    # the GPU tests: every @gpu test of tests/ found and run (skipped on CPU)
    marked = {f"tests/{f.name}": f.read_text(encoding="utf-8").count("\n@gpu\n")
              for f in (ROOT / "tests").glob("test_*.py")}
    gpu_tests = results["gpu_tests"]
    assert gpu_tests["ok"] and gpu_tests["files"] == sorted(f for f, n in marked.items() if n)
    assert gpu_tests["counts"] == {"skipped": sum(marked.values())} and sum(marked.values()) >= 5
    assert "tests/test_gpu.py::test_qlora_run_on_cuda_records_peak_memory" in {t["test"] for t in gpu_tests["tests"]}
    # the shipped scripts, and the web demo's streamed answer without gradio
    scripts = results["shipped_scripts"]
    assert list(scripts) == ["train_lora3", "inference_lora_batch", "merge_lora", "streamed_answer"]
    assert all(run["ok"] for run in scripts.values()), scripts
    assert scripts["train_lora3"]["summary"]["steps"] == results["settings"]["SCRIPT_STEPS"]
    assert scripts["inference_lora_batch"]["answered"] == results["settings"]["SCRIPT_QUESTIONS"]
    assert scripts["streamed_answer"]["streamed_pieces"] > 0 and scripts["streamed_answer"]["new_tokens"] > 0
    # GRPO from train_lora3.py's adapter: every step timed by the run itself, generation inside the step
    grpo, settings = results["grpo"], results["settings"]
    assert grpo["ok"], grpo
    assert grpo["start"].endswith("shipped-train_lora3/final") and grpo["summary"]["steps"] == settings["GRPO_STEPS"]
    assert len(grpo["step_times_s"]) == len(grpo["generation_times_s"]) == settings["GRPO_STEPS"] == 2
    assert all(0 < g < s for g, s in zip(grpo["generation_times_s"], grpo["step_times_s"]))
    assert grpo["seconds_per_step"] == round(statistics.median(grpo["step_times_s"]), 3)
    assert 0 < grpo["generation_share"] < 1 and grpo["update_share"] == round(1 - grpo["generation_share"], 3)
    assert grpo["projected_run_s"] == round(grpo["seconds_per_step"] * 200, 1)
    # each completion as long as asked (a random model never stops): the step measures what it says
    assert grpo["completion_tokens_mean"] == [settings["GRPO_COMPLETION_LENGTH"]] * 2
    assert 0 < grpo["estimated_peak_gib"] < grpo["estimated_device_total_gib"]  # train_grpo.py's own dry run
    assert grpo["peak_reserved_gib"] is None  # CPU: nothing to compare; a GPU run fills it and the two targets
    rendered = tiny_run.results_md.read_text(encoding="utf-8")
    assert f"- a step: {grpo['seconds_per_step']:.2f} s" in rendered and "200 steps would take about" in rendered
    # what comes back from a GPU machine: a few files, none of them deep
    assert sorted(f.name for f in tiny_run.out.iterdir()) == sorted(
        [tiny_run.results_file.name, "RESULTS.md", "gpu-check.log", "gpu-tests.xml"])


def test_missing_packages_are_found_down_the_requirements(tmp_path, monkeypatch):
    """A package the check needs, or one that one of those requires (as datasets requires xxhash), that is not
    installed, or installed at a version its requirer rules out, is named with what needs it; requirements of
    extras and of other platforms are not asked for."""
    def dist(name: str, *requires: str) -> None:
        info = tmp_path / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires), encoding="utf-8")

    dist("probe-top", "probe-middle>=1", "pytest-absent-probe; extra == 'test'",
         "windows-absent-probe; sys_platform == 'win32'", "probe-old>=2,<3")
    dist("probe-middle", "absent-probe-leaf>=2", "probe-top")
    dist("probe-old")  # installed at 1.0, as the GPU machine's huggingface-hub 1.33 under transformers 5.25
    monkeypatch.syspath_prepend(str(tmp_path))
    missing = report.missing_packages({"probe-top": "the probe", "absent-probe-top": "the other probe"})
    assert missing == [{"package": "absent-probe-top", "needed_by": "the other probe"},
                       {"package": "probe-old", "needed_by": "probe-top", "installed": "1.0", "wanted": "<3,>=2"},
                       {"package": "absent-probe-leaf", "needed_by": "probe-middle"}]
    assert report.missing_line(missing) == (
        "MISSING packages (carry their wheels): absent-probe-top (for the other probe), absent-probe-leaf "
        "(for probe-middle); WRONG versions (carry the right wheel): probe-old 1.0 (probe-top needs <3,>=2)")


def test_a_run_stopped_midway_leaves_valid_results(wheel_dir, tmp_path):
    """Killed mid-way (after its first stage), the results file is whole (at every read) and says what never ran."""
    out = tmp_path / "out"
    proc = subprocess.Popen(gpu_check(out, wheel_dir, "--gpu_tests=False"),  # no subprocess of its own to outlive it
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=os.environ | {"PYTHON": sys.executable, "TMPDIR": str(tmp_path)})  # a kill leaves
    # its temporary folders behind: in tmp_path, not in /tmp
    results, reads, deadline = None, 0, time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            for results_file in out.glob("*.json"):
                results = json.loads(results_file.read_text(encoding="utf-8"))  # never half a file
                reads += 1
            if results and results["stages"]["environment"]["status"] == "done":
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be stopped"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (results_file,) = out.glob("*.json")
    results = json.loads(results_file.read_text(encoding="utf-8"))
    stages = {name: stage["status"] for name, stage in results["stages"].items()}
    assert list(stages) == STAGES and reads > 1
    assert stages["environment"] == "done" and stages["shipped_scripts"] == "pending"
    assert set(stages.values()) <= {"done", "skipped", "running", "pending"}
    assert results["versions"]["torch"] and results["matmul_rate"]["tflops"] > 0
    assert results["environment"]["packages"]["gpu_check_probe"]["from_wheels"]
    assert results["configs"] == {} or stages["training"] != "pending"
    assert results["shipped_scripts"] is None
    assert "- stages: environment done" in report.render_results(results)  # a cut run renders too


def test_stages_that_do_not_fit_the_time_budget_are_recorded_skipped(bench, tmp_path):
    run = bench.main(["--mode=tiny", "--time_budget_s=1", "--gpu_tests=True", "--shipped_scripts=True",
                      "--grpo=True", f"--results_dir={tmp_path}"])
    stages = run["results"]["stages"]
    assert stages["environment"]["status"] == "done"
    for name in ("gpu_tests", "model_and_data", "training", "inference", "shipped_scripts", "grpo"):
        assert stages[name] == {"status": "skipped", "reason": "the time budget (1 s) ran out"}, name
    assert run["results"]["configs"] == {} and run["results"]["gpu_tests"] is None
    assert json.loads(run["results_file"].read_text(encoding="utf-8"))["stages"] == stages
    text = run["results_md"].read_text(encoding="utf-8")
    assert "- model: not built" in text and "gpu_tests skipped: the time budget (1 s) ran out" in text


def test_a_crashed_stage_still_leaves_results_and_rendered_tables(bench, tmp_path, monkeypatch):
    """A stage that raises (here: transformers refusing the machine's huggingface-hub, as a first GPU run did in a
    rehearsal) is recorded failed with its error, the later stages skipped, the JSON and RESULTS.md still written,
    and the exit is an error."""
    def refused(*args, **kwargs):
        raise ImportError("huggingface-hub>=2.4.0,<3.0 is required for a normal functioning of this module, "
                          "but found huggingface-hub==1.33.0.")

    monkeypatch.setattr(bench.synthetic, "prepare_model", refused)
    with pytest.raises(SystemExit, match="stage model_and_data failed"):
        bench.main(["--mode=tiny", "--gpu_tests=False", "--shipped_scripts=True", "--grpo=True",
                    f"--results_dir={tmp_path}"])
    (results_file,) = tmp_path.glob("*.json")
    stages = json.loads(results_file.read_text(encoding="utf-8"))["stages"]
    assert stages["model_and_data"]["status"] == "failed"
    assert stages["model_and_data"]["error"].startswith("ImportError: huggingface-hub>=2.4.0,<3.0 is required")
    for name in ("training", "inference", "shipped_scripts", "grpo"):
        assert stages[name] == {"status": "skipped", "reason": "stage model_and_data failed"}, name
    text = (tmp_path / "RESULTS.md").read_text(encoding="utf-8")
    assert "model_and_data failed" in text and "training skipped: stage model_and_data failed" in text


def test_tiny_mode_measures_every_recipe_that_runs_on_cpu(tiny_results):
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
        if c["runner"] == "trl":  # the estimate models our scripts
            assert c["estimated_peak_gib"] is None and c["how"].startswith("not estimated"), name
        else:
            assert c["estimated_peak_gib"] > 0 and c["how"].startswith("--dry_run's estimate"), (name, c["how"])
            # the device total adds the CUDA context (and a paged optimizer's states) to the torch-visible peak
            assert c["estimated_device_total_gib"] > c["estimated_peak_gib"], name
        assert c["peak_device_used_gib"] is None, name
        assert all(loss == loss for loss in c["losses"]), name
    configs = results["configs"]
    assert configs["original"]["speedup_vs_original"] == 1.0
    assert not configs["original"]["packing"] and configs["original"]["use_liger_kernel"] is False
    assert configs["bf16_lora"]["load_in_4bit"] is False
    assert configs["v2"]["embedding_mode"] == "tokens" and configs["v2_full_embedding"]["embedding_mode"] == "full"
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
    assert results["command"].startswith("python bench/bench.py --mode=tiny")
    for target in ("memory estimate error, worst recipe", "memory estimate error (device total), worst recipe"):
        assert next(t for t in results["targets"] if t["target"] == target)["met"] is None


def test_trl_trains_the_same_tokens_and_loss_as_v1(tiny_results):
    """TRL is fed our examples: the same tokens per step, and only the reply trained (the same first loss)."""
    v1, trl = tiny_results["configs"]["v1"], tiny_results["configs"]["trl"]
    assert trl["runner"] == "trl" and trl["packing"] and trl["load_in_4bit"]
    assert trl["step_tokens"] == v1["step_tokens"]
    assert trl["effective_batch"] == v1["effective_batch"] and trl["trainable_params"] == v1["trainable_params"]
    assert trl["losses"][0] == pytest.approx(v1["losses"][0], abs=1e-3)


def test_results_md_has_one_row_per_recipe(tiny_run, tiny_results):
    text = tiny_run.results_md.read_text(encoding="utf-8")  # beside the results, never the repo's bench/RESULTS.md
    assert f"- file: `{tiny_run.results_file.name}`" in text
    table = text[text.index("| config |"):].split("\n\n")[0].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == CONFIGS
    v1 = next(row for row in table if row.startswith("| v1 |")).split("|")
    assert v1[6].strip() == f"{tiny_results['configs']['v1']['estimated_peak_gib']:.2f}"  # beside the measured peak
    assert "- stages: environment done" in text and "GPU tests (`python -m pytest -m gpu" in text
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

    # GRPO's peak against train_grpo.py's estimate, twice, as for the recipes
    results["grpo"] |= {"peak_reserved_gib": 5.0, "estimated_peak_gib": 4.0, "peak_device_used_gib": 6.0,
                        "estimated_device_total_gib": 5.7}
    report.add_derived_figures(results)
    text = report.render_results(results)
    assert "- GRPO memory estimate error <= 15.0%: MISSED (measured 20.0%, gap +5.0%)" in text
    assert "- GRPO memory estimate error (device total) <= 15.0%: met (measured 5.0%, gap -10.0%)" in text
    assert ("- peak memory: reserved 5.00 GiB against the estimate's torch-visible 4.00 GiB; device used 6.00 GiB "
            "against its device total 5.70 GiB") in text

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

"""compare.py on hand-made run folders: the table, the plot, and the errors a user can hit."""
import json

import pytest

import compare
from medsft.errors import DataError, UserError

SUMMARY_V1 = {"version": "v1", "key_change": "basic QLoRA (NF4, paged AdamW 8-bit)", "final_train_loss": 1.3,
              "best_val_loss": 1.25, "best_step": 300, "steps": 400, "epochs": 3.0, "wall_time_s": 5640.2,
              "train_tokens": 5100000, "train_tokens_per_s": 904.3, "peak_gpu_mem_gib": 5.1,
              "peak_gpu_reserved_gib": 5.6, "trainable_params": 69730304, "device": "NVIDIA H100 80GB HBM3"}
# v2 runs on CPU: no GPU memory, and it has no key_change
SUMMARY_V2 = {"version": "v2", "final_train_loss": 1.2, "best_val_loss": 1.2, "best_step": 200, "steps": 400,
              "wall_time_s": 185.0, "train_tokens_per_s": 1200.0, "peak_gpu_mem_gib": None, "device": "cpu"}


def make_run(root, name, summary, metrics_lines=None):
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    if metrics_lines is None:
        metrics_lines = [json.dumps(r) for r in [
            {"step": 100, "epoch": 0.75, "loss": 1.6, "learning_rate": 2e-4, "grad_norm": 0.9},
            {"step": 100, "epoch": 0.75, "eval_loss": 1.5},
            {"step": 200, "epoch": 1.5, "loss": 1.4, "learning_rate": 1.5e-4},
            {"step": 200, "epoch": 1.5, "eval_loss": 1.3},
            {"step": 300, "epoch": 2.25, "loss": 1.3, "learning_rate": 5e-5},
            {"step": 400, "epoch": 3.0, "train_runtime": 5640.2, "train_loss": 1.4},
        ]]
    (run_dir / "metrics.jsonl").write_text("\n".join(metrics_lines) + "\n", encoding="utf-8")
    return run_dir


def run_compare(tmp_path, *run_dirs):
    table_path, plot_path = tmp_path / "out" / "table.md", tmp_path / "out" / "plot.png"
    compare.main([str(d) for d in run_dirs] + [f"--table_path={table_path}", f"--plot_path={plot_path}"])
    return table_path, plot_path


def table_rows(table_path):
    lines = table_path.read_text(encoding="utf-8").strip().splitlines()
    assert lines[0].split("|")[1].strip() == "version" and lines[1].startswith("|---")
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_table_and_plot(tmp_path, capsys):
    v1 = make_run(tmp_path, "qwen3-qlora-v1", SUMMARY_V1)
    v2 = make_run(tmp_path, "qwen3-qlora-v2", SUMMARY_V2)
    v3 = make_run(tmp_path, "qwen3-qlora-v3", {})  # nothing known: version falls back to the folder name
    table_path, plot_path = run_compare(tmp_path, v1, v2, v3)

    rows = table_rows(table_path)
    assert [row[0] for row in rows] == ["v1", "v2", "qwen3-qlora-v3"]
    r1, r2, r3 = rows
    assert r1 == ["v1", "basic QLoRA (NF4, paged AdamW 8-bit)", "1.3000", "1.2500 (300)", "—", "400",
                  "1:34:00", "904", "5.1"]
    assert r2[3] == "1.2000 (200)"
    assert r2[4] == "-4.0%"  # (1.20 - 1.25) / 1.25
    assert r2[1] == "—" and r2[6] == "3:05" and r2[8] == "—"
    assert r3[1:] == ["—"] * 8
    assert table_path.read_text(encoding="utf-8") in capsys.readouterr().out

    data = plot_path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_no_run_dirs(tmp_path):
    with pytest.raises(UserError, match="no run folders given"):
        compare.main([f"--table_path={tmp_path / 't.md'}"])


def test_dir_without_summary(tmp_path):
    good = make_run(tmp_path, "v1", SUMMARY_V1)
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(UserError, match="not-a-run: no summary.json"):
        run_compare(tmp_path, good, empty)


def test_malformed_metrics_line(tmp_path):
    good = make_run(tmp_path, "v1", SUMMARY_V1)
    bad = make_run(tmp_path, "v2", SUMMARY_V2,
                   ['{"step": 10, "loss": 2.0, "learning_rate": 1e-4}', '{"step": 20, "loss": 1.9,'])
    with pytest.raises(DataError) as excinfo:
        run_compare(tmp_path, good, bad)
    assert excinfo.value.line == 2
    assert f"{bad / 'metrics.jsonl'}: line 2" in str(excinfo.value)


def write_settings(run_dir, **changes):
    settings = {"DATA_SHA256": "a1" * 32, "MAX_LENGTH": 2048, "LONG_EXAMPLES": "shorten_think",
                "SYSTEM_PROMPT": "你是一个医学专家。", "LEARNING_RATE": 2e-4} | changes
    (run_dir / "settings.json").write_text(json.dumps(settings, ensure_ascii=False), encoding="utf-8")
    return run_dir


def test_runs_on_other_data_or_settings_get_a_warning_naming_the_setting_and_a_marked_row(tmp_path, capsys):
    v1 = write_settings(make_run(tmp_path, "v1", SUMMARY_V1))
    v2 = write_settings(make_run(tmp_path, "v2", SUMMARY_V2), LEARNING_RATE=1e-4)  # another recipe: comparable
    v3 = write_settings(make_run(tmp_path, "v3", {"version": "v3"}), DATA_SHA256="b2" * 32, MAX_LENGTH=1024)
    v4 = write_settings(make_run(tmp_path, "v4", {"version": "v4"}), LONG_EXAMPLES="drop", SYSTEM_PROMPT="你是助手。")
    table_path, _ = run_compare(tmp_path, v1, v2, v3, v4)

    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: the runs differ in data (sha256 of train.jsonl and val.jsonl) (v1 a1a1a1a1a1a1, v3 b2b2b2b2b2b2); "
        "their losses do not compare like for like",
        "warning: the runs differ in max_length (v1 2048, v3 1024); their losses do not compare like for like",
        "warning: the runs differ in long_examples (v1 'shorten_think', v4 'drop'); their losses do not compare "
        "like for like",
        "warning: the runs differ in system_prompt (v1 '你是一个医学专家。', v4 '你是助手。'); their losses do not "
        "compare like for like",
    ]
    text = table_path.read_text(encoding="utf-8")
    lines = text.strip().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:6]] == ["v1", "v2", "v3 †", "v4 †"]
    assert lines[-1] == ("† trained on other data or settings than v1 (data, max_length, long_examples, "
                         "system_prompt): not like for like")


def test_runs_on_the_same_data_and_settings_get_no_warning_and_no_mark(tmp_path, capsys):
    v1 = write_settings(make_run(tmp_path, "v1", SUMMARY_V1))
    v2 = write_settings(make_run(tmp_path, "v2", SUMMARY_V2), LEARNING_RATE=1e-4)
    old = make_run(tmp_path, "v3", {"version": "v3"})  # a run from before settings.json: cannot be checked
    table_path, _ = run_compare(tmp_path, v1, v2, old)
    out = capsys.readouterr().out
    assert "warning:" not in out and "note: v3 has no settings.json" in out
    assert [row[0] for row in table_rows(table_path)] == ["v1", "v2", "v3"]

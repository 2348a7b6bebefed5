"""data.py: checks, de-duplication, deterministic split, atomic output, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import data
from medsft.errors import DataError, UserError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample.jsonl"


def row(i, **fields):
    base = {"instruction": "你是医学专家。", "question": f"问题{i}：头痛怎么办？", "think": f"思考{i}。",
            "answer": f"回答{i}。", "metrics": {"quality_f1": 0.8}}
    return {**base, **fields}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sample_split_writes_files_without_leakage_or_duplicates(tmp_path):
    manifest = data.main([f"--source={SAMPLE}", f"--data_dir={tmp_path}"])
    train, val = read(tmp_path / "train.jsonl"), read(tmp_path / "val.jsonl")
    assert (tmp_path / "manifest.json").exists() and (tmp_path / "settings.json").exists()
    assert len(train) + len(val) == 50 and len(val) == 5
    questions = [r["question"] for r in train + val]
    assert len(set(questions)) == len(questions)
    assert manifest["counts"] == {"val": 5, "train": 45} and manifest["rows_read"] == 50
    assert set(train[0]) == {"id", "instruction", "question", "think", "answer", "metrics"}


def test_a_second_run_gives_byte_identical_files(tmp_path):
    data.main([f"--source={SAMPLE}", f"--data_dir={tmp_path / 'a'}"])
    data.main([f"--source={SAMPLE}", f"--data_dir={tmp_path / 'b'}"])
    for name in ("train.jsonl", "val.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_another_seed_gives_another_split(tmp_path):
    data.main([f"--source={SAMPLE}", f"--data_dir={tmp_path / 'a'}"])
    data.main([f"--source={SAMPLE}", f"--data_dir={tmp_path / 'b'}", "--seed=7"])
    assert (tmp_path / "a" / "val.jsonl").read_bytes() != (tmp_path / "b" / "val.jsonl").read_bytes()


def test_duplicates_are_dropped_from_train_only(tmp_path):
    rows = [row(i) for i in range(20)]
    rows += [row(3, question=" 问题3：头痛怎么办? "), row(5, question="问题５：头痛 怎么办？", answer="另一个回答。")]
    source = write_jsonl(tmp_path / "dup.jsonl", rows)
    manifest = data.main([f"--source={source}", f"--data_dir={tmp_path / 'out'}", "--val_fraction=0.5"])
    assert sum(manifest["dropped"]["train"].values()) + manifest["held_out_duplicates"] == 2
    assert set(manifest["dropped"]) == {"train"} and manifest["counts"]["val"] == 11
    train, val = read(tmp_path / "out" / "train.jsonl"), read(tmp_path / "out" / "val.jsonl")
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    assert len({r["id"] for r in train}) == len(train)


def test_think_tags_and_whitespace_are_cleaned(tmp_path):
    source = write_jsonl(tmp_path / "s.jsonl", [row(i, think="<think>\n 想法  \r\n\n\n第二行</think>") for i in range(10)])
    data.main([f"--source={source}", f"--data_dir={tmp_path / 'out'}"])
    assert read(tmp_path / "out" / "train.jsonl")[0]["think"] == "想法\n\n第二行"  # one blank line kept: a paragraph break


def test_test_fraction_writes_test_split_and_a_later_run_removes_it(tmp_path):
    out = tmp_path / "out"
    manifest = data.main([f"--source={SAMPLE}", f"--data_dir={out}", "--test_fraction=0.1"])
    assert manifest["counts"] == {"val": 5, "train": 40, "test": 5} and (out / "test.jsonl").exists()
    data.main([f"--source={SAMPLE}", f"--data_dir={out}"])
    assert not (out / "test.jsonl").exists()


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_json_csv_and_parquet_sources(tmp_path, suffix):
    import pandas as pd

    rows = [row(i) for i in range(10)]
    path = tmp_path / f"s{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".csv":
        pd.DataFrame([{**r, "metrics": None, "metrics.quality_f1": 0.8} for r in rows]).drop(columns="metrics").to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    manifest = data.main([f"--source={path}", f"--data_dir={tmp_path / 'out'}"])
    assert manifest["counts"] == {"val": 1, "train": 9}
    assert read(tmp_path / "out" / "train.jsonl")[0]["metrics"] == {"quality_f1": 0.8}


BAD_FILES = {
    "invalid_json": (b'{"question": "q", "think": "t", "answer": "a"}\n{"question": "q2", "think": \n', 2, "invalid JSON"),
    "missing_field": (b'{"question": "q", "think": "t", "answer": "a"}\n{"question": "q2", "answer": "a"}\n', 2,
                      "missing field 'think'"),
    "empty_field": (b'{"question": "q", "think": "t", "answer": "a"}\n\n{"question": "q2", "think": "t", "answer": "  "}\n', 3,
                    "field 'answer' is empty"),
    "wrong_type": (b'{"question": 12, "think": "t", "answer": "a"}\n', 1, "field 'question' must be a string, got int"),
    "not_utf8": ('{"question": "q", "think": "t", "answer": "a"}\n{"question": "发热", "think": "t", "answer": "a"}\n'
                 .encode("gbk"), 2, "not valid UTF-8"),
    "not_an_object": (b'["a", "b"]\n', 1, "expected a JSON object"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_name_the_line_and_write_nothing(tmp_path, kind):
    content, line, problem = BAD_FILES[kind]
    source = tmp_path / "bad.jsonl"
    source.write_bytes(content)
    with pytest.raises(DataError) as e:
        data.main([f"--source={source}", f"--data_dir={tmp_path / 'out'}"])
    assert e.value.line == line and problem in str(e.value) and str(source) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty"):
        data.main([f"--source={tmp_path / 'empty.jsonl'}", f"--data_dir={tmp_path / 'out'}"])


def test_missing_source_and_bad_settings(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        data.main([f"--source={tmp_path / 'nope.jsonl'}", f"--data_dir={tmp_path}"])
    with pytest.raises(UserError) as e:
        data.main(["--on_bad_row=ignore", "--val_fraction=1.5"])
    assert "on_bad_row" in str(e.value) and "val_fraction" in str(e.value)


def test_skip_mode_counts_bad_rows_by_reason(tmp_path):
    rows = [row(i) for i in range(10)] + [row(20, think=""), row(21, answer=5), {"question": "q", "answer": "a"}]
    source = write_jsonl(tmp_path / "s.jsonl", rows)
    manifest = data.main([f"--source={source}", f"--data_dir={tmp_path / 'out'}", "--on_bad_row=skip"])
    reasons = {}
    for split in manifest["dropped"].values():
        reasons |= split
    assert reasons == {"bad_type_answer": 1, "empty_think": 1, "missing_think": 1}
    assert sum(manifest["counts"].values()) == 10


def test_a_failed_run_keeps_the_previous_split(tmp_path):
    out = tmp_path / "out"
    data.main([f"--source={SAMPLE}", f"--data_dir={out}"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_jsonl(tmp_path / "bad.jsonl", [row(1), {"question": "q"}])
    with pytest.raises(DataError):
        data.main([f"--source={bad}", f"--data_dir={out}"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_crash_while_writing_leaves_the_old_files(tmp_path, monkeypatch):
    import os

    from medsft import records

    out = tmp_path / "out"
    data.main([f"--source={SAMPLE}", f"--data_dir={out}"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_fdopen, calls = os.fdopen, []

    def failing_fdopen(*args, **kwargs):  # the second temporary file fails to write (disk full, say)
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_fdopen(*args, **kwargs)

    monkeypatch.setattr(records.os, "fdopen", failing_fdopen)
    with pytest.raises(OSError):
        data.main([f"--source={SAMPLE}", f"--data_dir={out}", "--seed=1"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files left either


def test_command_line_error_has_no_traceback(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"question": "q", "think": "t", "answer": "a"}\n{oops\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "data.py", f"--source={source}", f"--data_dir={tmp_path / 'out'}"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert f"{source}: line 2: invalid JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_downloaded_dataset_folder_is_read_without_its_metadata(tmp_path, monkeypatch):
    from medsft import dataset_prep

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    write_jsonl(snapshot / "data" / "train.jsonl", [row(i) for i in range(12)])
    (snapshot / "dataset_infos.json").write_text('{"default": {}}')
    (snapshot / "configuration.json").write_text('{"framework": "pytorch"}')
    (snapshot / "README.md").write_text("# dataset card")
    (snapshot / ".mdl").write_text("x")
    assert dataset_prep.find_data_files(snapshot) == [snapshot / "data" / "train.jsonl"]

    monkeypatch.setattr(data, "download_dataset", lambda dataset_id, revision="": (snapshot, "master"))
    manifest = data.main([f"--data_dir={tmp_path / 'out'}"])  # the default source: a ModelScope dataset id
    assert manifest["source"] == "krisfu/delicate_medical_r1_data" and manifest["rows_read"] == 12
    assert manifest["source_files"] == [str(snapshot / "data" / "train.jsonl")]



def test_a_path_like_source_is_never_sent_to_modelscope(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("a local path must not be downloaded")

    monkeypatch.setattr(data, "download_dataset", no_download)
    with pytest.raises(UserError, match="no such file"):
        data.main([f"--source={tmp_path / 'missing'}", f"--data_dir={tmp_path / 'out'}"])
    folder = tmp_path / "mine"
    folder.mkdir()
    write_jsonl(folder / "part1.jsonl", [row(i) for i in range(6)])
    write_jsonl(folder / "part2.jsonl", [row(i) for i in range(6, 12)])
    manifest = data.main([f"--source={folder}", f"--data_dir={tmp_path / 'out'}"])
    assert manifest["rows_read"] == 12


def test_csv_with_an_unclosed_quote_names_the_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('question,think,answer\n"头痛？",想,答\n"咳嗽？",想,"答\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        data.main([f"--source={path}", f"--data_dir={tmp_path / 'out'}"])
    assert "invalid CSV" in str(e.value) and e.value.line == 3


# ---- the gold set ------------------------------------------------------------------------------------------


def test_gold_size_writes_the_best_rated_held_out_rows_and_never_train_rows(tmp_path):
    out = tmp_path / "out"
    manifest = data.main([f"--source={SAMPLE}", f"--data_dir={out}", "--test_fraction=0.1", "--gold_size=5"])
    gold, train = read(out / "gold.jsonl"), read(out / "train.jsonl")
    held_out = read(out / "val.jsonl") + read(out / "test.jsonl")
    assert len(gold) == 5 and not {r["id"] for r in gold} & {r["id"] for r in train}
    assert {r["id"] for r in gold} <= {r["id"] for r in held_out}
    scores = [r["metrics"]["quality_f1"] for r in gold]
    assert scores == sorted((r["metrics"]["quality_f1"] for r in held_out), reverse=True)[:5]
    # the sample's best rows overall are in train: the gold set must not take them
    assert max(r["metrics"]["quality_f1"] for r in train) > scores[0]
    assert manifest["gold"]["size"] == 5 and manifest["gold"]["ids"] == [r["id"] for r in gold]
    assert manifest["gold"]["from"] == ["test", "val"] and manifest["counts"] == {"val": 5, "train": 40, "test": 5}


def test_gold_ties_are_broken_by_id_and_unrated_rows_come_last(tmp_path):
    from medsft.dataset_prep import check_row, pick_gold_rows

    rows = [row(i, metrics={"quality_f1": 0.9 if i < 3 else 0.5}) for i in range(6)]
    rows += [row(6, metrics={}), row(7, metrics={"quality_f1": "high"}), row(8, metrics={"quality_f1": 0.1})]
    checked = [check_row(r)[0] for r in rows]
    best = pick_gold_rows(checked, 9)
    assert [r["metrics"].get("quality_f1") for r in best][:7] == [0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.1]
    assert [r["id"] for r in best[:3]] == sorted(r["id"] for r in checked[:3])
    assert {r["question"] for r in best[7:]} == {rows[6]["question"], rows[7]["question"]}
    assert pick_gold_rows(list(reversed(checked)), 4) == best[:4]  # the input order does not matter


def test_gold_size_larger_than_the_held_out_rows_is_refused_and_a_later_run_removes_gold(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="gold_size=6 but there are only 5 held-out"):
        data.main([f"--source={SAMPLE}", f"--data_dir={out}", "--gold_size=6"])
    assert not out.exists()
    data.main([f"--source={SAMPLE}", f"--data_dir={out}", "--gold_size=2"])
    assert len(read(out / "gold.jsonl")) == 2
    manifest = data.main([f"--source={SAMPLE}", f"--data_dir={out}"])
    assert not (out / "gold.jsonl").exists() and "gold" not in manifest

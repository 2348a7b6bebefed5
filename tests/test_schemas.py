"""data.py: the originals' exact split, the schemas it reads, the column mapping, and errors by the column."""
import json
import random
from pathlib import Path

import pytest

import data
from medsft.dataset_prep import question_key
from medsft.errors import DataError, UserError
from tests.conftest import ROOT

EXAMPLES = ROOT / "data" / "examples"


def row(i, **fields):
    return {"question": f"第{i}个问题：头痛怎么办？", "think": f"思考{i}。", "answer": f"回答{i}。"} | fields


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def ids(path):
    return [json.loads(line)["id"] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def originals_split(rows, test_fraction=0.0):
    """The originals' own few lines (the 80/10/10 variant is the Gradio project's)."""
    rows = list(rows)
    random.seed(42)
    random.shuffle(rows)
    n = len(rows)
    if test_fraction:
        return rows[:int(n * 0.8)], rows[int(n * 0.8):int(n * 0.9)], rows[int(n * 0.9):]
    return rows[:int(n * 0.9)], rows[int(n * 0.9):]


def key_ids(rows):
    return [question_key(r["question"])[:12] for r in rows]


# ---- the originals' split ----------------------------------------------------------------------------------


def test_2405_rows_give_the_originals_val_row_for_row(tmp_path):
    rows = [row(i) for i in range(2405)]
    manifest = data.main([f"--source={write_jsonl(tmp_path / 'all.jsonl', rows)}", f"--data_dir={tmp_path}"])
    train, val = originals_split(rows)
    assert manifest["counts"] == {"val": 241, "train": 2164}
    assert ids(tmp_path / "val.jsonl") == key_ids(val) and ids(tmp_path / "train.jsonl") == key_ids(train)


def test_80_10_10_gives_the_gradio_projects_three_slices(tmp_path):
    rows = [row(i) for i in range(137)]
    data.main([f"--source={write_jsonl(tmp_path / 'all.jsonl', rows)}", f"--data_dir={tmp_path}",
               "--test_fraction=0.1"])
    train, val, test = originals_split(rows, test_fraction=0.1)
    assert ids(tmp_path / "train.jsonl") == key_ids(train)
    assert ids(tmp_path / "val.jsonl") == key_ids(val) and ids(tmp_path / "test.jsonl") == key_ids(test)


def test_duplicates_and_skipped_bad_rows_move_no_val_row(tmp_path, capsys):
    rows = [row(i) for i in range(60)]
    rows[7], rows[13] = row(7, think=""), row(13, answer=5)  # bad rows: the first falls in train, the second in val
    rows += [row(i, answer="另一个回答。") for i in range(0, 60, 2)]  # 30 repeated questions
    manifest = data.main([f"--source={write_jsonl(tmp_path / 'all.jsonl', rows)}", f"--data_dir={tmp_path}",
                          "--on_bad_row=skip"])
    train, val = originals_split(rows)
    bad = [rows[7], rows[13]]
    assert any(r is bad[1] for r in val) and any(r is bad[0] for r in train)
    assert ids(tmp_path / "val.jsonl") == key_ids(r for r in val if r is not bad[1])
    val_keys = set(key_ids(val))
    expected_train, seen = [], set()
    for r in train:
        key = question_key(r["question"])[:12]
        if r is not bad[0] and key not in val_keys and key not in seen:
            expected_train.append(key)
            seen.add(key)
    assert ids(tmp_path / "train.jsonl") == expected_train
    dropped = manifest["dropped"]
    assert dropped["val"] == {"bad_type_answer": 1} and dropped["train"]["empty_think"] == 1
    assert dropped["train"]["duplicate_of_val"] >= 1 and dropped["train"]["duplicate_in_train"] >= 1
    assert dropped["train"]["duplicate_of_val"] + dropped["train"]["duplicate_in_train"] == \
        len(train) - 1 - len(expected_train)
    out = capsys.readouterr().out
    assert "dropped 1 val rows: bad_type_answer" in out and "dropped 1 train rows: empty_think" in out
    assert f"dropped {dropped['train']['duplicate_of_val']} train rows: duplicate_of_val" in out


def test_all_rows_dropped_says_so_with_the_top_reasons(tmp_path):
    rows = [row(i, think="") for i in range(8)] + [row(i, answer=3) for i in range(8, 10)]
    with pytest.raises(UserError, match=r"all 10 rows were dropped \(top reasons: empty_think 8, bad_type_answer 2"):
        data.main([f"--source={write_jsonl(tmp_path / 'bad.jsonl', rows)}", f"--data_dir={tmp_path / 'out'}",
                   "--on_bad_row=skip"])
    assert not (tmp_path / "out").exists()


# ---- schemas -------------------------------------------------------------------------------------------------


def split_of(tmp_path, source, *extra):
    manifest = data.main([f"--source={source}", f"--data_dir={tmp_path / 'out'}", "--val_fraction=0.2", *extra])
    rows = [json.loads(line) for name in ("train", "val")
            for line in (tmp_path / "out" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    return manifest, {r["id"]: r for r in rows}


def test_gradio_seed_rows_keep_meta_and_split_the_think_out_of_output(tmp_path):
    rows = [{"instruction": "你是医生。", "input": f"问题{i}：胸闷怎么办？", "output": f"<think>想{i}。</think>\n答{i}。",
             "meta": {"specialty": "心内科", "risk_level": "中"}} for i in range(5)]
    manifest, split = split_of(tmp_path, write_jsonl(tmp_path / "g.jsonl", rows))
    first = split[question_key("问题0：胸闷怎么办？")[:12]]
    assert manifest["schemas"] == {str(tmp_path / "g.jsonl"): "gradio_seed"}
    assert (first["instruction"], first["question"], first["think"], first["answer"]) == \
        ("你是医生。", "问题0：胸闷怎么办？", "想0。", "答0。")
    assert first["meta"] == {"specialty": "心内科", "risk_level": "中"}


def test_alpaca_rows_join_input_and_count_replies_without_reasoning(tmp_path, capsys):
    rows = [{"instruction": f"问题{i}", "input": "补充" if i == 0 else "", "output": f"答{i}。"} for i in range(4)]
    rows.append({"instruction": "问题9", "input": "", "output": "<think>\n想。\n</think>\n\n答9。"})
    manifest, split = split_of(tmp_path, write_jsonl(tmp_path / "a.jsonl", rows))
    assert split[question_key("问题0\n补充")[:12]]["think"] == ""
    assert split[question_key("问题9")[:12]]["think"] == "想。"
    assert manifest["replies_without_reasoning"] == 4 and manifest["replies"] == 5
    assert "4 of 5 replies have no reasoning" in capsys.readouterr().out


def test_medical_o1_and_the_column_mapping(tmp_path):
    rows = [{"Question": f"问{i}", "Complex_CoT": f"想{i}", "Response": f"答{i}"} for i in range(5)]
    _, split = split_of(tmp_path, write_jsonl(tmp_path / "o1.jsonl", rows))
    assert split[question_key("问1")[:12]]["think"] == "想1"
    mapped = [{"prompt": f"问{i}", "cot_text": f"想{i}", "reply": f"答{i}", "sys": "你是医生。", "dept": "儿科"}
              for i in range(5)]
    manifest, split = split_of(tmp_path, write_jsonl(tmp_path / "m.jsonl", mapped),
                               "--columns=question:prompt,think:cot_text,answer:reply,system:sys,meta:dept")
    assert split[question_key("问1")[:12]] | {"id": 0} == {"id": 0, "instruction": "你是医生。", "question": "问1",
                                                        "think": "想1", "answer": "答1", "metrics": {},
                                                        "meta": {"dept": "儿科"}}
    assert list(manifest["schemas"].values()) == ["columns"]


def test_sharegpt_and_openai_conversations_are_one_row_each(tmp_path):
    share = [{"conversations": [{"from": "human", "value": f"问{i}"}, {"from": "gpt", "value": f"<think>想</think>答{i}"},
                                {"from": "human", "value": "还有呢？"}, {"from": "gpt", "value": "没有了。"}]}
             for i in range(5)]
    _, split = split_of(tmp_path, write_jsonl(tmp_path / "s.jsonl", share))
    assert split[question_key("问2")[:12]]["messages"] == [
        {"role": "user", "content": "问2"}, {"role": "assistant", "content": "答2", "think": "想"},
        {"role": "user", "content": "还有呢？"}, {"role": "assistant", "content": "没有了。", "think": ""}]
    openai = [{"messages": [{"role": "system", "content": "你是医生。"}, {"role": "user", "content": f"问{i}"},
                            {"role": "assistant", "content": f"答{i}", "reasoning_content": "想"}],
               "meta": {"specialty": "儿科"}} for i in range(5)]
    manifest, split = split_of(tmp_path, write_jsonl(tmp_path / "o.jsonl", openai))
    assert split[question_key("问3")[:12]] == {"id": question_key("问3")[:12], "meta": {"specialty": "儿科"},
                                              "messages": [{"role": "system", "content": "你是医生。"},
                                                           {"role": "user", "content": "问3"},
                                                           {"role": "assistant", "content": "答3", "think": "想"}]}
    assert manifest["replies"] == 5 and manifest["replies_without_reasoning"] == 0


def test_schema_can_be_forced_and_an_unknown_one_names_the_keys(tmp_path):
    rows = [{"instruction": f"问{i}", "input": "", "output": f"答{i}", "meta": {"a": 1}} for i in range(5)]
    source = write_jsonl(tmp_path / "x.jsonl", rows)
    manifest, split = split_of(tmp_path, source, "--schema=alpaca")
    assert list(manifest["schemas"].values()) == ["alpaca"] and split[question_key("问1")[:12]]["instruction"] == ""
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "问", "response": "答"}])
    with pytest.raises(UserError) as e:
        data.main([f"--source={unknown}", f"--data_dir={tmp_path / 'none'}"])
    message = str(e.value)
    assert "\n" not in message and "unknown schema" in message and "prompt, response" in message
    assert "gradio_seed, alpaca, medical_o1, sharegpt, openai" in message and not (tmp_path / "none").exists()
    assert message.endswith("--columns=question:prompt,answer:response)")
    with pytest.raises(UserError) as e:  # the shipped CSV needs its mapping; the error spells it out
        data.main([f"--source={EXAMPLES / 'custom_columns.csv'}", f"--data_dir={tmp_path / 'none'}"])
    assert "--columns=question:prompt,think:reasoning,answer:response" in str(e.value)


def test_a_reasoning_column_is_never_dropped_silently(tmp_path):
    rows = [{"instruction": f"问{i}", "input": "", "output": f"答{i}", "rationale": "想"} for i in range(5)]
    with pytest.raises(UserError) as e:
        data.main([f"--source={write_jsonl(tmp_path / 'r.jsonl', rows)}", f"--data_dir={tmp_path / 'out'}"])
    assert "column 'rationale' looks like reasoning" in str(e.value)
    assert "--columns=question:instruction,think:rationale,answer:output" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_misnamed_column_is_one_line_with_the_closest_match(tmp_path):
    rows = [{"Question": f"问{i}", "Complex_COT": "想", "Response": "答"} for i in range(30)]
    with pytest.raises(UserError) as e:
        data.main([f"--source={write_jsonl(tmp_path / 'o1.jsonl', rows)}", f"--data_dir={tmp_path / 'out'}"])
    message = str(e.value)
    assert message.count("\n") == 0 and "no column 'Complex_CoT'" in message
    assert "columns found: Complex_COT, Question, Response" in message and "closest: 'Complex_COT'" in message


def test_csv_errors_name_the_line_where_the_row_starts(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('question,think,answer\n"头痛？\n多行",想,答\n\n"咳嗽？",想,""\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        data.main([f"--source={path}", f"--data_dir={tmp_path / 'out'}"])
    assert e.value.line == 5 and "field 'answer' is empty" in str(e.value)


def test_stratify_by_keeps_each_strata_share_within_one_row(tmp_path):
    specialties = ["心内科"] * 23 + ["儿科"] * 11 + ["眼科"] * 5 + ["骨科"] * 1
    rows = [{"instruction": "", "input": f"问题{i}", "output": f"<think>想</think>答{i}", "meta": {"specialty": s}}
            for i, s in enumerate(specialties)]
    out = tmp_path / "out"
    manifest = data.main([f"--source={write_jsonl(tmp_path / 'g.jsonl', rows)}", f"--data_dir={out}",
                          "--test_fraction=0.2", "--val_fraction=0.2", "--stratify_by=meta.specialty"])
    assert manifest["counts"] == {"val": 8, "train": 24, "test": 8} and manifest["stratify_by"] == "meta.specialty"
    for name in ("val", "test"):
        split = [json.loads(line)["meta"]["specialty"] for line in (out / f"{name}.jsonl").read_text().splitlines()]
        for specialty in set(specialties):
            assert abs(split.count(specialty) - specialties.count(specialty) * len(split) / 40) < 1


@pytest.mark.parametrize("name, extra", [("gradio_seed.jsonl", []), ("alpaca.json", []), ("medical_o1.json", []),
                                         ("sharegpt.json", []), ("openai_messages.jsonl", []),
                                         ("custom_columns.csv", ["--columns=question:prompt,think:reasoning,"
                                                                 "answer:response"])])
def test_each_shipped_example_gives_a_split(tmp_path, name, extra):
    manifest = data.main([f"--source={EXAMPLES / name}", f"--data_dir={tmp_path}", *extra])
    assert manifest["counts"]["val"] >= 1 and manifest["counts"]["train"] >= 8 and not manifest["dropped"]


def test_a_sharegpt_turn_key_wrong_in_every_row_is_one_line_naming_both_keys(tmp_path):
    rows = [{"conversations": [{"from": "human", "text": f"问{i}"}, {"from": "gpt", "text": f"答{i}"}]}
            for i in range(30)]
    source = write_jsonl(tmp_path / "text.jsonl", rows)
    for skip in ("", "--on_bad_row=skip"):
        with pytest.raises(UserError) as e:
            data.main([f"--source={source}", f"--data_dir={tmp_path / 'none'}", *filter(None, [skip])])
        message = str(e.value)
        assert "\n" not in message and str(source) in message and not (tmp_path / "none").exists()
        assert "no turn in 'conversations' has the key 'value' (they have 'text' instead)" in message
        assert "rename 'text' to 'value'" in message

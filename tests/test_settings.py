"""The --name=value override of a script's UPPER_CASE constants."""
import pytest

from medsft.errors import UserError
from medsft.settings import check_settings, parse_settings

DEFAULTS = {"MAX_LENGTH": 2048, "LEARNING_RATE": 2e-4, "PACKING": True, "OUTPUT_DIR": "out",
            "TARGET_MODULES": ["q_proj", "v_proj"], "RUN_DIRS": [], "lower_case": 1, "_PRIVATE": 3}


def test_values_are_parsed_to_the_defaults_types():
    cfg = parse_settings(DEFAULTS, ["--max_length=512", "--learning_rate", "1e-3", "--packing=false",
                                    "--output_dir=o/p", "--target_modules=q_proj,k_proj"])
    assert (cfg.MAX_LENGTH, cfg.LEARNING_RATE, cfg.PACKING, cfg.OUTPUT_DIR) == (512, 1e-3, False, "o/p")
    assert cfg.TARGET_MODULES == ["q_proj", "k_proj"]
    assert parse_settings(DEFAULTS, ["--target_modules=[\"a\"]"]).TARGET_MODULES == ["a"]
    assert parse_settings(DEFAULTS, ["--learning_rate=1"]).LEARNING_RATE == 1.0


@pytest.mark.parametrize("text,value", [("true", True), ("False", False), ("1", True), ("no", False)])
def test_bools_accept_true_and_false(text, value):
    assert parse_settings(DEFAULTS, [f"--packing={text}"]).PACKING is value


def test_only_upper_case_public_names_are_settings():
    cfg = parse_settings(DEFAULTS, [])
    assert "lower_case" not in cfg.as_dict() and "_PRIVATE" not in cfg.as_dict()


def test_unknown_name_ends_with_a_suggestion():
    with pytest.raises(UserError) as e:
        parse_settings(DEFAULTS, ["--max_lenght=5", "--packing=maybe"])
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "true or false" in lines[0]
    assert lines[-1].startswith("error: unknown setting --max_lenght; did you mean --max_length?")
    with pytest.raises(UserError) as e:
        parse_settings(DEFAULTS, ["--zzz=1"])
    assert "did you mean" not in str(e.value)


def test_type_errors_are_collected():
    with pytest.raises(UserError) as e:
        parse_settings(DEFAULTS, ["--max_length=abc", "--learning_rate=fast"])
    assert "integer" in str(e.value) and "number" in str(e.value)


@pytest.mark.parametrize("script", ["train_lora.py", "inference_lora.py", "data.py", "evaluate.py"])
def test_help_prints_every_setting_with_its_comment_and_exits_0(script, capsys):
    import importlib
    import subprocess
    import sys

    from tests.conftest import ROOT

    # -h as a real process (the exit code); --help through main(), the same code path without a new interpreter
    done = subprocess.run([sys.executable, script, "-h"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(script.removesuffix(".py")).main(["--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out == done.stdout
    source = (ROOT / script).read_text(encoding="utf-8")
    block = source.split("# ----")[1]  # the ruled constants block
    names = [line.split("=")[0].strip() for line in block.splitlines() if line[:1].isupper() and " = " in line]
    assert len(names) > 5
    for name in names:
        assert f"--{name.lower()}=" in done.stdout, name
    line = next(l for l in done.stdout.splitlines() if "--seed=" in l)
    comment = next(l for l in source.splitlines() if l.startswith("SEED ")).split("#", 1)[1].strip()
    assert line.rstrip().endswith(comment)
    if script == "train_lora.py":  # every tracker REPORT_TO takes
        report_to = next(l for l in done.stdout.splitlines() if "--report_to=" in l)
        assert all(f'"{name}"' in report_to for name in ("auto", "swanlab", "tensorboard", "none")), report_to


def test_a_mistyped_name_on_the_command_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "train_lora.py", "--learning_rat=1e-4", "--batch_size=abc"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown setting --learning_rat; did you mean --learning_rate?")
    assert "--batch_size takes an integer" in done.stderr


@pytest.mark.parametrize("arg,message", [("--max_length=1.5", "integer"), ("--packing=maybe", "true or false"),
                                         ("--learning_rate=fast", "number")])
def test_wrong_type_stops_with_a_message(arg, message):
    with pytest.raises(UserError, match=message):
        parse_settings(DEFAULTS, [arg])


def test_all_problems_are_reported_together():
    with pytest.raises(UserError) as e:
        parse_settings(DEFAULTS, ["--nope=1", "--max_length=x"])
    assert "--nope" in str(e.value) and "integer" in str(e.value)


def test_aliases_and_positional_arguments():
    cfg = parse_settings(DEFAULTS, ["-o", "x", "a", "b"], aliases={"-o": "output_dir"}, positional="run_dirs")
    assert cfg.OUTPUT_DIR == "x" and cfg.RUN_DIRS == ["a", "b"]
    with pytest.raises(UserError, match="unexpected argument"):
        parse_settings(DEFAULTS, ["stray"])


def test_settings_save_as_json(tmp_path):
    import json

    parse_settings(DEFAULTS, ["--max_length=7"]).save(tmp_path)
    assert json.loads((tmp_path / "settings.json").read_text())["MAX_LENGTH"] == 7


def test_check_settings_lists_every_problem():
    with pytest.raises(UserError) as e:
        check_settings(["a is wrong", False, "b is wrong"])
    assert "a is wrong" in str(e.value) and "b is wrong" in str(e.value)
    check_settings([False, None, ""])  # nothing to report


def test_run_settings_fill_what_the_command_line_leaves_and_each_value_says_where_it_came_from(tmp_path, capsys):
    import json
    import re

    from medsft.settings import use_run_settings

    run = tmp_path / "run"
    saved = {"MODEL_PATH": "/models/base", "DATA_DIR": "/data/x", "SYSTEM_PROMPT": "系统", "MAX_LENGTH": 512,
             "LONG_EXAMPLES": "drop", "LEARNING_RATE": 1e-4}
    for adapter in (run / "final", run / "best"):
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
    for folder in (run, run / "final"):  # best/ has no settings.json: its OUTPUT_DIR's is the run's
        (folder / "settings.json").write_text(json.dumps(saved))
    defaults = {"MODEL_PATH": "Qwen/Qwen3-1.7B", "ADAPTER_PATH": "", "DATA_DIR": "data", "SYSTEM_PROMPT": "默认",
                "MAX_LENGTH": 4096, "LONG_EXAMPLES": "shorten_think", "TOP_P": 0.9}

    cfg = parse_settings(defaults, [f"--adapter_path={run / 'final'}", "--system_prompt=我的"])
    assert use_run_settings(cfg) == saved
    assert (cfg.MODEL_PATH, cfg.DATA_DIR, cfg.SYSTEM_PROMPT, cfg.MAX_LENGTH) == ("/models/base", "/data/x", "我的", 4096)
    cfg.print("t")
    out = capsys.readouterr().out
    for name, origin in (("model_path", "from the run"), ("data_dir", "from the run"), ("adapter_path", "command line"),
                         ("system_prompt", "command line"), ("max_length", "default"), ("top_p", "default")):
        assert re.search(rf"^{name} +=.*  \({origin}\)$", out, re.M), name
    assert set(cfg.as_dict()) == set(defaults)  # the origins are not settings: settings.json stays as it was

    cfg = parse_settings(defaults, [f"--adapter_path={run / 'best'}"])
    use_run_settings(cfg, training_length=True)  # evaluate.py, merge_lora.py: MAX_LENGTH is training's length
    assert (cfg.MODEL_PATH, cfg.MAX_LENGTH, cfg.LONG_EXAMPLES) == ("/models/base", 512, "drop")

    merged = tmp_path / "merged"  # a merged folder is the model: its recorded base is not taken
    merged.mkdir()
    (merged / "settings.json").write_text(json.dumps(saved))
    cfg = parse_settings(defaults, [f"--model_path={merged}"])
    use_run_settings(cfg)
    assert (cfg.MODEL_PATH, cfg.DATA_DIR, cfg.SYSTEM_PROMPT) == (str(merged), "/data/x", "系统")
    cfg = parse_settings(defaults, [f"--model_path={tmp_path}"])  # no run recorded: every default stays
    assert use_run_settings(cfg) == {} and cfg.DATA_DIR == "data"

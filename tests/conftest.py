"""Shared fixtures: a tiny random Qwen3 with the real tokenizer, the sample split, and a trained adapter."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MEDSFT_QUIET_CPU", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE = ROOT / "data" / "sample.jsonl"

# settings that make a training run take seconds on the tiny model
FAST_TRAINING = ["--max_steps=3", "--eval_steps=2", "--save_steps=2", "--batch_size=2",
                 "--gradient_accumulation=2", "--report_to=none", "--progress_bar=False",
                 "--sample_max_new_tokens=8", "--eval_batch_size=8", "--max_length=320"]

# short rows whose questions hold lexicon terms, for tests that train many steps or several times
SHORT_QUESTIONS = ["高血压患者头痛怎么办？", "糖尿病可以吃水果吗？", "孩子发热咳嗽要做血常规吗？", "胃痛反酸是胃炎吗？",
                   "失眠可以吃安眠药吗？", "甲状腺结节要做B超吗？", "哮喘发作怎么处理？", "布洛芬能退烧吗？",
                   "心电图异常要紧吗？", "腹泻脱水怎么办？", "湿疹反复怎么办？", "骨质疏松怎么预防？"]


def gpu(test):
    """A CUDA-only test: marked `gpu` (`pytest -m gpu` selects them all) and skipped on CPU."""
    needs_cuda = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
    return pytest.mark.gpu(needs_cuda(test))


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler for the test, as in a terminal (a suite started with `&` has SIGINT ignored)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from medsft.tiny_model import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from medsft.tiny_model import qwen3_tokenizer_dir

    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory) -> Path:
    """data.py's split of the bundled sample (45 train, 5 val)."""
    import data

    out = tmp_path_factory.mktemp("sample-split")
    data.main([f"--source={SAMPLE}", f"--data_dir={out}"])
    return out


def short_split(out: Path, questions: list[str], val_fraction: float) -> Path:
    """data.py's split, in `out`, of one short row per question (~70 tokens each, think and answer included)."""
    import json

    import data

    rows = [{"question": q, "think": f"用户问的是{q[:-1]}。\n需要先了解病史。", "answer": f"关于{q[:-1]}，建议及时就医。"}
            for q in questions]
    (out / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    data.main([f"--source={out / 'rows.jsonl'}", f"--data_dir={out}", f"--val_fraction={val_fraction}"])
    return out


@pytest.fixture(scope="session")
def short_data_dir(tmp_path_factory) -> Path:
    """A split of 12 short rows (10 train, 2 val)."""
    return short_split(tmp_path_factory.mktemp("short-split"), SHORT_QUESTIONS, 0.15)


@pytest.fixture(scope="session")
def odd_val_data_dir(tmp_path_factory) -> Path:
    """A split of 15 short rows (10 train, 5 val): two processes evaluate 3 and 2 of them. For the multi-process
    runs, whose cost is their tokens (the sample's rows are cut to max_length 320, these have ~70)."""
    questions = SHORT_QUESTIONS + ["咳嗽有痰要吃抗生素吗？", "贫血吃什么补血？", "痛风发作能喝酒吗？"]
    return short_split(tmp_path_factory.mktemp("odd-val-split"), questions, 0.33)


@pytest.fixture(scope="session")
def train_once(tmp_path_factory, tiny_model_dir):
    """train(version, data_dir, *extra) -> (OUTPUT_DIR, what main returned, what it printed): a FAST_TRAINING run
    of train_lora.py ("v1"), train_lora2.py ("v2") or train_lora3.py ("v3"), trained once per session for every
    test that asks for the same one. Tests that change the folder copy it first."""
    import contextlib
    import importlib
    import io

    runs = {}

    def train(version, data_dir, *extra):
        key = (version, str(data_dir), extra)
        if key not in runs:
            script = importlib.import_module({"v1": "train_lora", "v2": "train_lora2", "v3": "train_lora3"}[version])
            out, printed = tmp_path_factory.mktemp(f"run-{version}"), io.StringIO()
            with contextlib.redirect_stdout(printed):
                result = script.main([f"--model_path={tiny_model_dir}", f"--data_dir={data_dir}",
                                      f"--output_dir={out}", *FAST_TRAINING, *extra])
            runs[key] = out, result, printed.getvalue()
        return runs[key]

    return train


def two_step_run(train_once, short_data_dir, folder) -> Path:
    """A copy in `folder` of the session's 2-step v1 run with a checkpoint every step, for tests that resume it."""
    import shutil

    shutil.copytree(train_once("v1", short_data_dir, "--max_steps=2", "--save_steps=1")[0], folder, dirs_exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def trained_adapter(train_once, sample_data_dir) -> Path:
    """OUTPUT_DIR/final of a 3-step v1 run on the tiny model."""
    return train_once("v1", sample_data_dir)[0] / "final"

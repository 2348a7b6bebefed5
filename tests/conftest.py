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
                 "--sample_max_new_tokens=8", "--eval_batch_size=8"]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


gpu = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")


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
    """data.py's split of the bundled sample, with a 20% val split so val has 10 rows."""
    import data

    out = tmp_path_factory.mktemp("sample-split")
    data.main([f"--source={SAMPLE}", f"--data_dir={out}", "--val_fraction=0.2"])
    return out


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_model_dir, sample_data_dir) -> Path:
    """OUTPUT_DIR/final of a 3-step v1 run on the tiny model."""
    import train_lora

    out = tmp_path_factory.mktemp("trained-v1")
    train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={sample_data_dir}", f"--output_dir={out}",
                     *FAST_TRAINING])
    return out / "final"

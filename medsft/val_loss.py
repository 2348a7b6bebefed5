"""The loss evaluate.py reports, for any model: loaded as training evaluated it, scored with training's label mask.

    model, tokenizer = load_model_for_loss("Qwen/Qwen3-1.7B", "output/qwen3-1.7b-qlora-v3/final", load_in_4bit=True)
    rows_loss(model, tokenizer, rows, max_length=2048, system_prompt=SYSTEM_PROMPT)   # {"loss": ..., "examples": ...}

evaluate.py and merge_lora.py (which measures NF4 base + adapter, bf16 base + adapter and the merged folder) both
use it, so their numbers compare with each other and with training's eval loss.
"""
from types import SimpleNamespace

from medsft.chat_format import SYSTEM_PROMPT


def load_model_for_loss(model_path: str, adapter_path="", load_in_4bit: bool = True, shown_path=None,
                        tokenizer=None):
    """(model, tokenizer): the base as training evaluated it (4-bit with fp32 norms and embedding, or bf16), with
    the adapter on it when one is given. `shown_path` names the base in errors (a model id rather than its cache);
    a tokenizer already loaded is used as is."""
    from peft import prepare_model_for_kbit_training

    from medsft.assistant import attach_adapter
    from medsft.model_loading import load_base_model, load_tokenizer, resolve_model_path

    model_path = resolve_model_path(str(model_path))
    tokenizer = tokenizer or load_tokenizer(model_path)
    model = load_base_model(model_path, load_in_4bit)
    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter_path:
        model = attach_adapter(model, adapter_path, shown_path or model_path)
    return model.eval(), tokenizer


def rows_loss(model, tokenizer, rows: list[dict], max_length: int = 2048, system_prompt: str = SYSTEM_PROMPT,
              long_examples: str = "shorten_think", batch_size: int = 4, no_think_fraction: float = 0.0) -> dict:
    """Mean token loss over `rows` tokenised as training tokenises them (the same shortening and label mask, and
    training's val draw of no_think_fraction replies without reasoning): loss, perplexity, think_loss,
    answer_loss (no_think_answer_loss when some replies have no reasoning), tokens, examples, shortened, dropped."""
    from torch.utils.data import DataLoader

    from medsft.batching import Collator
    from medsft.no_think import mix_val_examples
    from medsft.trainer import evaluate_loss
    from medsft.training_data import tokenize_rows

    settings = SimpleNamespace(MAX_LENGTH=max_length, SYSTEM_PROMPT=system_prompt, LONG_EXAMPLES=long_examples,
                               NO_THINK_FRACTION=no_think_fraction)
    examples, kept, counts = tokenize_rows(tokenizer, rows, settings)
    examples = mix_val_examples(examples, kept, tokenizer, settings)
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=Collator(tokenizer.pad_token_id, True))
    return evaluate_loss(model, loader, device=model.device) | {"examples": len(examples), **counts}


def measure_loss(model_path: str, adapter_path, load_in_4bit: bool, rows: list[dict], tokenizer, **options) -> dict:
    """rows_loss of a model loaded by load_model_for_loss, which is freed again (GPU memory included) before
    returning: merge_lora.py measures three models in turn on one card, with one tokenizer."""
    import gc

    import torch

    model, _ = load_model_for_loss(model_path, adapter_path, load_in_4bit, tokenizer=tokenizer)
    result = rows_loss(model, tokenizer, rows, **options)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result

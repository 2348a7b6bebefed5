"""Generating replies with Qwen3's thinking-mode sampling; shared by training's sample answer and inference."""
from dataclasses import dataclass

from medsft.chat_format import END_OF_TURN, SYSTEM_PROMPT, encode_prompt, split_reply

END_TOKENS = (END_OF_TURN, "<|endoftext|>")  # Qwen3 stops at either


@dataclass
class Reply:
    text: str  # the raw reply, "<think>\n...\n</think>\n\n..." without the end token
    think: str
    answer: str
    finish_reason: str  # "stop" (an end token), "length" (hit max_new_tokens) or "stopped" (asked to stop)
    new_tokens: int


def prepare_for_generation(model) -> None:
    """Eval mode, KV cache on, gradient checkpointing off (it silently disables the cache)."""
    model.eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "is_activation_checkpointing"):  # transformers >= 5.20 renamed gradient checkpointing
        if inner.is_activation_checkpointing:
            inner.activation_checkpointing_disable()
    elif getattr(inner, "is_gradient_checkpointing", False):
        inner.gradient_checkpointing_disable()
    inner.config.use_cache = True


def end_token_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]


def generation_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float = 0.95, top_k: int = 20) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": end_token_ids(tokenizer),
              "pad_token_id": tokenizer.pad_token_id, "use_cache": True}
    if temperature > 0:
        kwargs |= {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    else:
        kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return kwargs


def decode_reply(tokenizer, new_ids: list[int]) -> Reply:
    ends = set(end_token_ids(tokenizer))
    cut = next((i for i, t in enumerate(new_ids) if t in ends), None)
    kept = new_ids if cut is None else new_ids[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=False)
    think, answer = split_reply(text)
    return Reply(text, think, answer, "length" if cut is None else "stop", len(kept) + (cut is not None))


def generate_from_prompts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 2048,
                          temperature: float = 0.6, top_p: float = 0.95, top_k: int = 20, seed: int | None = None,
                          streamer=None, **generate_kwargs) -> list[Reply]:
    """Replies, with finish reason and token count, to prompts given as token ids from encode_prompt (one
    left-padded batch). A prompt given as a string is tokenised as it is: control text in it becomes control tokens.
    """
    import torch
    from transformers import set_seed

    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    inputs = tokenizer.pad({"input_ids": prompts}, padding=True, padding_side="left", return_tensors="pt")
    inputs = inputs.to(model.device)
    if seed is not None:
        set_seed(seed)
    with torch.no_grad():
        output = model.generate(**inputs, streamer=streamer, **generate_kwargs,
                                **generation_kwargs(tokenizer, max_new_tokens, temperature, top_p, top_k))
    width = inputs["input_ids"].shape[1]
    return [decode_reply(tokenizer, row[width:].tolist()) for row in output]


def generate_replies(model, tokenizer, questions, system_prompt: str = SYSTEM_PROMPT, histories=None,
                     **options) -> list[Reply]:
    """Replies to a batch of questions; `options` are generate_from_prompts' sampling arguments."""
    histories = histories or [()] * len(questions)
    prompts = [encode_prompt(tokenizer, q, system_prompt, h) for q, h in zip(questions, histories)]
    return generate_from_prompts(model, tokenizer, prompts, **options)

"""Offline demo: the whole pipeline (data -> QLoRA v3 training -> inference) on CPU in a few minutes.

    python demo.py
    python demo.py --demo_dir=/tmp/medsft-demo --max_steps=3

It checks that the pipeline runs; it does NOT make a medical model. The model is a tiny random Qwen3
(2 layers, hidden size 64) with the real Qwen3 tokenizer, trained for a few steps, so its answers are
random tokens. No GPU, no network and no model download are needed. Rerunning replaces the earlier outputs.
"""
from pathlib import Path

import data
import inference_lora
import train_lora3
from medsft.settings import parse_settings
from medsft.tiny_model import build_tiny_qwen3

ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
DEMO_DIR = "demo_output"                   # everything the demo writes; delete it when done
MAX_STEPS = 6                              # optimizer steps of the v3 training run
MAX_LENGTH = 256                           # tokens per training example (longer thinks are shortened), for speed
QUESTION = "医生，我头痛怎么办？"            # asked of the trained adapter at the end
MAX_NEW_TOKENS = 32                        # tokens of that answer
# -----------------------------------------------------------------------------

_NOTICE = ("This demo checks that the pipeline runs end to end on CPU. It is NOT a medical model: the model\n"
          "is a tiny random Qwen3 trained for a few steps, so its answers are random tokens.")


def main(argv=None):
    cfg = parse_settings(globals(), argv)
    demo = Path(cfg.DEMO_DIR)
    print(f"==== medsft pipeline demo ====\n{_NOTICE}\nwriting everything to {demo}/\n", flush=True)

    # ========== 1. Data: check, de-duplicate and split the bundled 50-row sample ==========
    data_dir = demo / "data"
    data.main([f"--source={ROOT / 'data' / 'sample.jsonl'}", f"--data_dir={data_dir}"])

    # ========== 2. A tiny random Qwen3 with the real Qwen3 tokenizer ==========
    model_dir = build_tiny_qwen3(demo / "tiny-qwen3")
    print(f"built a tiny random Qwen3 in {model_dir}/", flush=True)

    # ========== 3. QLoRA v3 training (4-bit base, masked questions) for a few steps ==========
    train_dir = demo / "train-v3"
    train_lora3.main([
        f"--model_path={model_dir}", f"--data_dir={data_dir}", f"--output_dir={train_dir}",
        f"--lexicon_path={ROOT / 'data' / 'medical_terms.tsv'}", f"--max_steps={cfg.MAX_STEPS}",
        f"--eval_steps={max(1, cfg.MAX_STEPS // 2)}", f"--save_steps={max(1, cfg.MAX_STEPS // 2)}",
        f"--max_length={cfg.MAX_LENGTH}", "--batch_size=1", "--gradient_accumulation=1", "--eval_batch_size=8",
        "--overwrite=True", "--report_to=none", "--sample_max_new_tokens=16", "--log_steps=1",
    ])

    # ========== 4. Inference: the trained adapter on the tiny base ==========
    adapter_dir = train_dir / "final"
    # the base and system prompt come from the run's settings.json, as they do for evaluate.py and the web demo
    reply = inference_lora.main([f"--adapter_path={adapter_dir}", "-q", cfg.QUESTION,
                                 f"--max_new_tokens={cfg.MAX_NEW_TOKENS}"])

    # ========== 5. Where everything went ==========
    print(f"\n==== demo finished ====\n"
          f"data splits:      {data_dir}/train.jsonl, {data_dir}/val.jsonl, {data_dir}/manifest.json\n"
          f"tiny base model:  {model_dir}/\n"
          f"training run:     {train_dir}/ (summary.json, metrics.jsonl, loss.png)\n"
          f"trained adapter:  {adapter_dir}/\n"
          f"answer above:     {reply.finish_reason}, {reply.new_tokens} new tokens\n\n"
          f"next, on the demo's adapter (its base, data and prompt come from the run; the tiny model never stops\n"
          f"on its own, so each command keeps the demo's lengths):\n"
          + "".join(f"  {command}\n" for command in follow_up_commands(cfg, adapter_dir))
          + f"\n{_NOTICE}\nFor the real model: python data.py && python train_lora3.py && python inference_lora.py",
          flush=True)
    return {"data_dir": data_dir, "model_dir": model_dir, "train_dir": train_dir, "adapter_dir": adapter_dir,
            "reply": reply}


def follow_up_commands(cfg, adapter_dir) -> list[str]:
    """What to run next on the demo's adapter, with the demo's own lengths: the README shows the same commands."""
    return [f"python evaluate.py --adapter_path={adapter_dir} --max_length={cfg.MAX_LENGTH}",
            f"python inference_lora.py --adapter_path={adapter_dir} -q \"{cfg.QUESTION}\" "
            f"--max_new_tokens={cfg.MAX_NEW_TOKENS}"]


if __name__ == "__main__":
    main()

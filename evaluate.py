"""Honest numbers for a trained adapter: val/test loss and perplexity, and safety metrics on real predictions.

    python evaluate.py                                              # loss of the v3 adapter on data/val.jsonl
    python evaluate.py --adapter_path=                              # the bare base model, for reference
    python evaluate.py --model_path=output/qwen3-1.7b-full/final --adapter_path=    # a train.py (full) model, in bf16
    python evaluate.py --generate=20 --generate_from=gold           # answers to the gold set's questions
    python evaluate.py --generate=50                                # + answers to 50 val rows and the red-team set, scored
    python evaluate.py --predictions=out.jsonl --report_path=r.json # score a file from inference_lora.py -b
    python evaluate.py --generate=20 --thinking=False               # answers without thinking (enable_thinking=False)

The loss uses training's label mask (assistant reply and <|im_end|> only), and is also split into the think
part and the answer part: these are the numbers comparable with the originals' val losses. The generation
metrics score the model's predictions, never the reference data; medsft/safety_metrics.py defines each one.
When DATA_DIR holds gold.jsonl (data.py --gold_size), its loss is reported too, as gold_loss. With
NO_THINK_FRACTION (as in training) that share of rows is scored as replies without reasoning (no_think_answer_loss).

The thinking switch: NO_THINK_CHECK val questions are asked with thinking off, by the base and by the adapter,
and only the start of each reply is generated: *_no_think_empty_think_share is the share that honours
"/no_think" (an empty think block, then the answer), *_no_think_thinks_anyway_share the share that thinks
anyway, *_thinking_off_thinks_anyway_share the share that opens a think block after enable_thinking=False's.
"""
import contextlib
import json
import math
from pathlib import Path

from medsft import chat_format
from medsft.assistant import check_adapter_path
from medsft.errors import UserError
from medsft.records import read_jsonl, write_files_atomically
from medsft.settings import check_settings, parse_settings, read_run_settings

# -----------------------------------------------------------------------------
# model
MODEL_PATH = "Qwen/Qwen3-1.7B"                       # the base the adapter was trained on, or train.py's final/
ADAPTER_PATH = "output/qwen3-1.7b-qlora-v3/final"    # "" = the model in MODEL_PATH alone
LOAD_IN_4BIT = True                                  # as in training, so the loss compares with training's eval loss;
                                                     # a merged or full model folder (no adapter) is scored in bf16
# loss metrics
DATA_DIR = "data"                                    # val.jsonl (and test.jsonl, gold.jsonl if present) from data.py
MAX_LENGTH = 2048                                    # as in training
LONG_EXAMPLES = "shorten_think"                      # as in training: longer examples lose the end of their think
SYSTEM_PROMPT = chat_format.SYSTEM_PROMPT         # as in training
NO_THINK_FRACTION = 0.0                              # as in training: this share of rows is scored without reasoning
EVAL_BATCH_SIZE = 4                                  # examples per forward pass
# generation metrics
PREDICTIONS = ""                                     # a batch output of inference_lora.py to score (no model is loaded)
GENERATE = 0                                         # > 0: first answer this many val rows + the red-team set, then score
GENERATE_FROM = "val"                                # where those rows come from: "val", or "gold" (DATA_DIR/gold.jsonl)
REDTEAM_PATH = "data/redteam.jsonl"                  # high-risk questions with expect = emergency / no_dose / crisis
MAX_NEW_TOKENS = 2048                                # per answer; p99 of a whole reference reply is ~1,400 tokens
TEMPERATURE = 0.6                                    # Qwen3's thinking-mode sampling; 0 = greedy
THINKING = True                                      # False: answers as Qwen3's enable_thinking=False, no think
# the thinking switch
NO_THINK_CHECK = 20                                  # val questions asked with thinking off, base and adapter; 0 = skip
NO_THINK_CHECK_TOKENS = 8                            # new tokens per reply: enough to see whether it starts thinking
BATCH_SIZE = 8                                       # answers generated at once
SEED = 42                                            # sampling seed
# output
REPORT_PATH = "eval_report.json"                     # every number, as JSON; also printed as a table
# -----------------------------------------------------------------------------


def main(argv=None):
    # ========== 1. Settings (MAX_LENGTH, SYSTEM_PROMPT, LONG_EXAMPLES default to the adapter's training run) ==========
    cfg = parse_settings(globals(), argv)
    use_training_settings(cfg, globals())
    cfg.print("evaluate.py settings")
    score_only = bool(cfg.PREDICTIONS) and cfg.GENERATE == 0
    report_path = Path(cfg.REPORT_PATH)
    check_settings([
        (report_path.is_dir() or not report_path.parent.exists()) and f"report_path {report_path} must be a file "
        "in an existing folder",
        cfg.PREDICTIONS and not Path(cfg.PREDICTIONS).is_file() and f"predictions {cfg.PREDICTIONS}: not found",
        cfg.PREDICTIONS and cfg.GENERATE > 0 and "give --predictions or --generate, not both",
        not score_only and not (Path(cfg.DATA_DIR) / "val.jsonl").is_file()
        and f"{Path(cfg.DATA_DIR) / 'val.jsonl'}: not found; run `python data.py` first",
        cfg.GENERATE > 0 and not Path(cfg.REDTEAM_PATH).is_file() and f"redteam_path {cfg.REDTEAM_PATH}: not found",
        cfg.GENERATE < 0 and "generate must be >= 0",
        not 0 <= cfg.NO_THINK_FRACTION <= 1 and f"no_think_fraction must be in [0, 1], not {cfg.NO_THINK_FRACTION}",
        cfg.NO_THINK_CHECK < 0 and "no_think_check must be >= 0",
        cfg.NO_THINK_CHECK_TOKENS < 4 and "no_think_check_tokens must be at least 4 (the empty think block's length)",
        *generate_from_problems(cfg),
    ])
    if cfg.ADAPTER_PATH and not score_only:
        check_adapter_path(cfg.ADAPTER_PATH)  # before the base model loads
    report = {} if score_only else {"model_path": cfg.MODEL_PATH, "adapter_path": cfg.ADAPTER_PATH or None,
                                    "load_in_4bit": cfg.LOAD_IN_4BIT}

    # ========== 2. Loss and perplexity on val (and test, and the gold set) ==========
    if not score_only:
        model, tokenizer = load_model_for_loss(cfg)
        for split in ("val", "test", "gold"):
            path = Path(cfg.DATA_DIR) / f"{split}.jsonl"
            if path.is_file():
                report |= {f"{split}_{k}": v for k, v in split_loss(model, tokenizer, path, cfg).items()}
        if cfg.NO_THINK_CHECK > 0:  # and whether thinking can still be switched off
            report |= thinking_switch_report(model, tokenizer, cfg)
        del model

    # ========== 3. Predictions: read them, or generate them ==========
    predictions_path = cfg.PREDICTIONS
    if cfg.GENERATE > 0:
        predictions_path = generate_predictions(cfg)
    if predictions_path:
        from medsft.safety_metrics import score_predictions

        rows = [row for _, row in read_jsonl(predictions_path)]
        if not rows:
            raise UserError(f"error: {predictions_path}: no predictions in the file")
        report["predictions"] = str(predictions_path)

        # ========== 4. Generation metrics ==========
        report |= score_predictions(rows, count_tokens=token_counter(cfg))

    # ========== 5. Report ==========
    write_files_atomically({Path(cfg.REPORT_PATH): json.dumps(report, ensure_ascii=False, indent=2) + "\n"})
    print_report(report)
    print(f"wrote {cfg.REPORT_PATH}")
    return report


def use_training_settings(cfg, defaults: dict) -> None:
    """Take MAX_LENGTH, SYSTEM_PROMPT, LONG_EXAMPLES and LOAD_IN_4BIT from the training run's settings.json unless
    given here: the adapter's, or with no adapter, the model folder's (a merged model or train.py's final/), which
    is then scored in bf16, the way it ships, whatever its training loaded."""
    path = Path(cfg.ADAPTER_PATH or cfg.MODEL_PATH) / "settings.json"
    trained = read_run_settings(path.parent)
    for name in ("MAX_LENGTH", "SYSTEM_PROMPT", "LONG_EXAMPLES", "LOAD_IN_4BIT", "NO_THINK_FRACTION"):
        if name in trained and getattr(cfg, name) == defaults[name] and trained[name] != defaults[name]:
            print(f"note: {name.lower()} = {trained[name]!r}, as the model was trained ({path})")
            setattr(cfg, name, trained[name])
    if trained and not cfg.ADAPTER_PATH and cfg.LOAD_IN_4BIT:  # a merged folder or train.py's final/ ships in bf16
        print(f"note: load_in_4bit = False: {cfg.MODEL_PATH} is a whole trained model (merged or full), scored in "
              "bf16 as it ships")
        cfg.LOAD_IN_4BIT = False


def load_model_for_loss(cfg):
    """The base and adapter loaded as training evaluated them: 4-bit with fp32 norms and embedding."""
    from medsft.val_loss import load_model_for_loss as load_as_evaluated

    return load_as_evaluated(cfg.MODEL_PATH, cfg.ADAPTER_PATH, cfg.LOAD_IN_4BIT, shown_path=cfg.MODEL_PATH)


def split_loss(model, tokenizer, path: Path, cfg) -> dict:
    from medsft.val_loss import rows_loss

    result = rows_loss(model, tokenizer, [row for _, row in read_jsonl(path)], cfg.MAX_LENGTH, cfg.SYSTEM_PROMPT,
                       cfg.LONG_EXAMPLES, cfg.EVAL_BATCH_SIZE, cfg.NO_THINK_FRACTION)
    print(f"{path}: {result['examples']} examples ({result.pop('shortened')} shortened, {result.pop('dropped')} "
          f"dropped), loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}", flush=True)
    return result


def thinking_switch_report(model, tokenizer, cfg) -> dict:
    """medsft.no_think.switch_check's shares on the first NO_THINK_CHECK val questions, for the base (the adapter
    switched off) and the adapter: whether fine-tuning kept Qwen3's way of answering without thinking."""
    from medsft.generation import prepare_for_generation
    from medsft.losses import mixed_precision
    from medsft.no_think import switch_check
    from medsft.schemas import opening_question

    rows = [row for _, row in read_jsonl(Path(cfg.DATA_DIR) / "val.jsonl")][: cfg.NO_THINK_CHECK]
    questions = [opening_question(row) for row in rows]
    prepare_for_generation(model)
    models = {"base": model.disable_adapter(), "adapter": contextlib.nullcontext()} if cfg.ADAPTER_PATH \
        else {"model": contextlib.nullcontext()}
    report = {"no_think_check_questions": len(questions)}
    for name, adapter_state in models.items():
        with adapter_state, mixed_precision(model.device):
            shares = switch_check(model, tokenizer, questions, cfg.SYSTEM_PROMPT, cfg.NO_THINK_CHECK_TOKENS,
                                  cfg.BATCH_SIZE, temperature=cfg.TEMPERATURE, seed=cfg.SEED)
        report |= {f"{name}_{key}": value for key, value in shares.items()}
        print(f"thinking off, {name}: " + ", ".join(f"{key} {value:.2f}" for key, value in shares.items()), flush=True)
    return report


def generate_from_problems(cfg) -> list[str]:
    if cfg.GENERATE_FROM not in ("val", "gold"):
        return [f"generate_from must be 'val' or 'gold', not {cfg.GENERATE_FROM!r}"]
    gold = Path(cfg.DATA_DIR) / "gold.jsonl"
    if cfg.GENERATE > 0 and cfg.GENERATE_FROM == "gold" and not gold.is_file():
        return [f"generate_from='gold' but {gold} is not there; run `python data.py --gold_size=N` first"]
    return []


def generate_predictions(cfg) -> Path:
    """Answers to the first GENERATE val (or gold) rows and the red-team set, through inference_lora.py's batch mode."""
    import inference_lora
    from medsft.schemas import opening_question

    source = cfg.GENERATE_FROM
    held_out = [row for _, row in read_jsonl(Path(cfg.DATA_DIR) / f"{source}.jsonl")][: cfg.GENERATE]
    redteam = [row for _, row in read_jsonl(cfg.REDTEAM_PATH)]
    questions = Path(cfg.REPORT_PATH).with_suffix(".questions.jsonl")
    predictions = Path(cfg.REPORT_PATH).with_suffix(".predictions.jsonl")
    rows = [{"id": f"{source}-{row.get('id', i)}", "question": opening_question(row)} for i, row in enumerate(held_out)]
    rows += redteam
    write_files_atomically({questions: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)})
    predictions.unlink(missing_ok=True)  # batch mode resumes by id: answers of another adapter must not count
    inference_lora.main([f"--model_path={cfg.MODEL_PATH}", f"--adapter_path={cfg.ADAPTER_PATH}",
                         f"--batch_file={questions}", f"--output_file={predictions}",
                         f"--max_new_tokens={cfg.MAX_NEW_TOKENS}", f"--temperature={cfg.TEMPERATURE}",
                         f"--batch_size={cfg.BATCH_SIZE}", f"--seed={cfg.SEED}", f"--system_prompt={cfg.SYSTEM_PROMPT}",
                         f"--thinking={cfg.THINKING}"])
    return predictions


def token_counter(cfg):
    """Token counts with the model's tokenizer when it can be loaded without a download; else characters only."""
    if not Path(cfg.MODEL_PATH).is_dir():
        return None
    from medsft.model_loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.MODEL_PATH)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def print_report(report: dict) -> None:
    from medsft.console import markdown_table
    from medsft.safety_metrics import RATE_KEYS, format_report_table

    losses = [(k, v) for k, v in report.items()
              if k.endswith(("_loss", "_perplexity", "_tokens", "_examples", "_share", "_questions"))]
    if losses:
        print(markdown_table(["metric", "value"], [[key, f"{value:.4f}" if isinstance(value, float) and math.isfinite(value)
                                                    else value] for key, value in losses], ["<", ">"]))
    if any(key in report for key in RATE_KEYS):
        print(format_report_table(report))


if __name__ == "__main__":
    main()

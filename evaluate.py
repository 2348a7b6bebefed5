"""Honest numbers for a trained adapter: val/test loss and perplexity, and safety metrics on real predictions.

    python evaluate.py                                              # loss of the v3 adapter on data/val.jsonl
    python evaluate.py --adapter_path=output/qwen3-1.7b-qlora-v1/final   # another run's adapter, as it was trained
    python evaluate.py --adapter_path= --model_path=Qwen/Qwen3-1.7B # the bare base model, for reference
    python evaluate.py --model_path=output/qwen3-1.7b-full/final --adapter_path=    # a train.py (full) model, in bf16
    python evaluate.py --generate=20 --generate_from=gold           # answers to the gold set's questions
    python evaluate.py --generate=50 --redteam=True                 # + answers to 50 val rows and the red-team set
    python evaluate.py --predictions=out.jsonl --report_path=r.json # score a file from inference_lora.py -b
    python evaluate.py --generate=20 --thinking=False               # answers without thinking (enable_thinking=False)

The run is the source of truth: unless given on the command line, MODEL_PATH, DATA_DIR, SYSTEM_PROMPT,
MAX_LENGTH, LONG_EXAMPLES, LOAD_IN_4BIT and NO_THINK_FRACTION are those of the run that trained the model (the
settings.json of ADAPTER_PATH, or with no adapter of MODEL_PATH's merged or full model folder); the settings
printout says where each value came from.

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
from medsft.errors import Interrupted, UserError, exit_on_interrupt
from medsft.model_loading import report_folder
from medsft.records import read_jsonl, write_files_atomically
from medsft.settings import check_settings, parse_settings, use_run_settings

# -----------------------------------------------------------------------------
# model
MODEL_PATH = "Qwen/Qwen3-1.7B"                       # the base the adapter was trained on, or train.py's final/
ADAPTER_PATH = "output/qwen3-1.7b-qlora-v3/final"    # a run's final/ or best/; "" = the model in MODEL_PATH alone
LOAD_IN_4BIT = True                                  # as in training, so the loss compares with training's eval loss;
                                                     # a merged or full model folder (no adapter) is scored in bf16
# loss metrics
DATA_DIR = "data"                                    # val.jsonl (and test.jsonl, gold.jsonl if present) from data.py
MAX_LENGTH = 2048                                    # as in training
LONG_EXAMPLES = "shorten_think"                      # as in training: longer examples lose the end of their think
SYSTEM_PROMPT = chat_format.SYSTEM_PROMPT            # as in training
NO_THINK_FRACTION = 0.0                              # as in training: this share of rows is scored without reasoning
EVAL_BATCH_SIZE = 4                                  # examples per forward pass
# generation metrics
PREDICTIONS = ""                                     # a batch output of inference_lora.py to score (no model is loaded)
GENERATE = 0                                         # > 0: answer this many val rows, then score the answers
GENERATE_FROM = "val"                                # where those rows come from: "val", or "gold" (DATA_DIR/gold.jsonl)
REDTEAM = "auto"                                     # answer the red-team set too: "auto" = with --generate on a GPU;
                                                     # True (even without --generate); False
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
REPORT_PATH = ""                                     # every number, as JSON (also printed as a table); "" =
                                                     # eval_report.json in the run's folder (beside final/), else
                                                     # in DATA_DIR, or beside PREDICTIONS when only scoring them
# -----------------------------------------------------------------------------


def main(argv=None):
    # ========== 1. Settings: what is not given here comes from the run that trained the model ==========
    cfg = parse_settings(globals(), argv)
    run = use_run_settings(cfg, training_length=True, also=("LOAD_IN_4BIT", "NO_THINK_FRACTION"))
    if run and not cfg.ADAPTER_PATH and cfg.LOAD_IN_4BIT and "LOAD_IN_4BIT" not in cfg._given:
        print(f"note: load_in_4bit = False: {cfg.MODEL_PATH} is a whole trained model (merged or full), scored in "
              "bf16 as it ships")
        cfg.LOAD_IN_4BIT, cfg._origins["LOAD_IN_4BIT"] = False, "a whole trained model: bf16, as it ships"
    redteam, redteam_problem = redteam_choice(cfg)
    generating = cfg.GENERATE > 0 or redteam
    score_only = bool(cfg.PREDICTIONS) and not generating
    if not cfg.REPORT_PATH:  # never the working folder
        folder = Path(cfg.PREDICTIONS).parent if score_only else report_folder(
            cfg.ADAPTER_PATH or (cfg.MODEL_PATH if run else ""), cfg.DATA_DIR)
        cfg.REPORT_PATH, cfg._origins["REPORT_PATH"] = str(folder / "eval_report.json"), "default"
    cfg.print("evaluate.py settings")
    report_path = Path(cfg.REPORT_PATH)
    check_settings([
        redteam_problem,
        (report_path.is_dir() or not report_path.parent.exists()) and f"report_path {report_path} must be a file "
        "in an existing folder",
        cfg.PREDICTIONS and not Path(cfg.PREDICTIONS).is_file() and f"predictions {cfg.PREDICTIONS}: not found",
        cfg.PREDICTIONS and generating and "give --predictions or --generate/--redteam, not both",
        not score_only and not (Path(cfg.DATA_DIR) / "val.jsonl").is_file()
        and f"{Path(cfg.DATA_DIR) / 'val.jsonl'}: not found; run `python data.py` first",
        redteam and not Path(cfg.REDTEAM_PATH).is_file() and f"redteam_path {cfg.REDTEAM_PATH}: not found",
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
    held_out, redteam_rows = generation_questions(cfg, redteam) if generating else ([], [])
    print_plan(cfg, score_only, held_out, redteam_rows)

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
    if generating:
        predictions_path = generate_predictions(cfg, held_out + redteam_rows)
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
    from medsft.chat_format import system_prompt_of
    from medsft.generation import prepare_for_generation
    from medsft.losses import mixed_precision
    from medsft.no_think import switch_check
    from medsft.schemas import opening_question

    rows = [row for _, row in read_jsonl(Path(cfg.DATA_DIR) / "val.jsonl")][: cfg.NO_THINK_CHECK]
    questions = [opening_question(row) for row in rows]
    system_prompts = [system_prompt_of(row, cfg.SYSTEM_PROMPT) for row in rows]
    prepare_for_generation(model)
    models = {"base": model.disable_adapter(), "adapter": contextlib.nullcontext()} if cfg.ADAPTER_PATH \
        else {"model": contextlib.nullcontext()}
    report = {"no_think_check_questions": len(questions)}
    for name, adapter_state in models.items():
        with adapter_state, mixed_precision(model.device):
            shares = switch_check(model, tokenizer, questions, system_prompts, cfg.NO_THINK_CHECK_TOKENS,
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


def redteam_choice(cfg) -> tuple[bool, str]:
    """(answer the red-team set?, a problem with REDTEAM or ""): "auto" answers it with --generate on a GPU."""
    choice = str(cfg.REDTEAM).strip().lower()
    if choice == "auto":
        import torch

        return cfg.GENERATE > 0 and torch.cuda.is_available(), ""
    if choice in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return choice in ("true", "1", "yes", "on"), ""
    return False, f"redteam must be 'auto', True or False, not {cfg.REDTEAM!r}"


def generation_questions(cfg, redteam: bool) -> tuple[list[dict], list[dict]]:
    """(the first GENERATE val or gold rows' questions, each with its row's system prompt, else SYSTEM_PROMPT;
    the red-team set's questions if asked for)."""
    from medsft.chat_format import system_prompt_of
    from medsft.schemas import opening_question

    source = cfg.GENERATE_FROM
    held_out = [row for _, row in read_jsonl(Path(cfg.DATA_DIR) / f"{source}.jsonl")][: cfg.GENERATE]
    rows = [{"id": f"{source}-{row.get('id', i)}", "question": opening_question(row),
             "system_prompt": system_prompt_of(row, cfg.SYSTEM_PROMPT)} for i, row in enumerate(held_out)]
    return rows, [row for _, row in read_jsonl(cfg.REDTEAM_PATH)] if redteam else []


def print_plan(cfg, score_only: bool, held_out: list[dict], redteam_rows: list[dict]) -> None:
    """What will run, and how much of it, before anything slow starts."""
    steps = [] if score_only else [f"loss on {Path(cfg.DATA_DIR) / 'val.jsonl'} (and test, gold if there)"]
    if held_out or redteam_rows:
        parts = ([f"{len(held_out)} {cfg.GENERATE_FROM} rows"] if held_out else []) + \
                ([f"{len(redteam_rows)} red-team questions"] if redteam_rows else [])
        steps.append(f"{len(held_out) + len(redteam_rows)} answers ({' + '.join(parts)}) of up to "
                     f"{cfg.MAX_NEW_TOKENS} new tokens each, {cfg.BATCH_SIZE} at a time, then their safety metrics")
    elif cfg.PREDICTIONS:
        steps.append(f"the safety metrics of {cfg.PREDICTIONS}")
    if cfg.GENERATE > 0 and not redteam_rows:
        steps.append("no red-team answers (--redteam=True adds them; 'auto' does on a GPU)")
    print("plan: " + "; ".join(steps), flush=True)


def generate_predictions(cfg, questions: list[dict]) -> Path:
    """Answers to `questions` (val or gold rows, and the red-team set), through inference_lora.py's batch mode."""
    import inference_lora

    questions_path = Path(cfg.REPORT_PATH).with_suffix(".questions.jsonl")
    predictions = Path(cfg.REPORT_PATH).with_suffix(".predictions.jsonl")
    write_files_atomically({questions_path: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in questions)})
    predictions.unlink(missing_ok=True)  # batch mode resumes by id: answers of another adapter must not count
    try:
        inference_lora.main([f"--model_path={cfg.MODEL_PATH}", f"--adapter_path={cfg.ADAPTER_PATH}",
                             f"--batch_file={questions_path}", f"--output_file={predictions}",
                             f"--max_new_tokens={cfg.MAX_NEW_TOKENS}", f"--temperature={cfg.TEMPERATURE}",
                             f"--batch_size={cfg.BATCH_SIZE}", f"--seed={cfg.SEED}", f"--system_prompt={cfg.SYSTEM_PROMPT}",
                             f"--thinking={cfg.THINKING}"])
    except Interrupted:  # batch mode's line above is about its own rerun; evaluate's rerun answers from the start
        exit_on_interrupt(f"evaluate.py: no report was written; the same evaluate.py command again answers every "
                          f"question from the start ({predictions} is replaced)")
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

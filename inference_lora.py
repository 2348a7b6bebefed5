"""Ask the fine-tuned model: one question, a batch file, or an interactive chat (base Qwen3 + LoRA adapter).

    python inference_lora.py -q "医生，我最近总是头晕，还伴有耳鸣，这可能是什么原因？"
    python inference_lora.py -q "胸痛持续了3天，需要立即就医吗？" -s emergency
    python inference_lora.py                                        # a multi-turn chat in the terminal
    python inference_lora.py -b data/redteam.jsonl -o output/redteam.pred.jsonl   # rerun to resume
    python inference_lora.py -c output/qwen3-1.7b-qlora-v1/final --load_in_4bit=True --temperature=0
    python inference_lora.py --adapter_path= -q "什么是高血压？"      # the bare base model, for comparison
    python inference_lora.py --thinking=False -q "什么是高血压？"     # the answer at once, without thinking
    python inference_lora.py --list_scenarios

Unless given on the command line, MODEL_PATH and SYSTEM_PROMPT are those the adapter was trained with (its
run's settings.json; a merged or full model folder's SYSTEM_PROMPT with --adapter_path=); the settings
printout says where each value came from.
"""
import json
import sys
import time
from pathlib import Path

from medsft import chat_format
from medsft.assistant import (SCENARIOS, MedicalAssistant, ThinkAnswerSplitter, append_rows, check_adapter_path,
                              finished_ids, history_turn, prediction_row, read_batch_file, scenario_table,
                              thinking_note)
from medsft.errors import UserError, exit_on_interrupt
from medsft.model_loading import warn_if_cpu
from medsft.settings import check_settings, parse_settings, use_run_settings

# -----------------------------------------------------------------------------
# model
MODEL_PATH = "Qwen/Qwen3-1.7B"                   # the base: a local folder or a model id; default: the adapter's run's
ADAPTER_PATH = "output/qwen3-1.7b-qlora-v3/final"  # OUTPUT_DIR/final of a training run; "" = the bare base model
LOAD_IN_4BIT = False                             # False: bf16 (float32 on CPU); True: 4-bit NF4, for small GPUs
SYSTEM_PROMPT = chat_format.SYSTEM_PROMPT        # the training prompt; a scenario appends its guidance to it
# what to answer
QUESTION = ""                                    # -q: one question, answer streamed to the terminal
BATCH_FILE = ""                                  # -b: a .jsonl of {"question", optional "id", "scenario", ...}
OUTPUT_FILE = ""                                 # -o: predictions .jsonl; "" = BATCH_FILE with suffix .pred.jsonl
SCENARIO = ""                                    # -s: one of --list_scenarios, e.g. diagnosis; "" = none
LIST_SCENARIOS = False                           # print the scenarios and stop
BATCH_SIZE = 8                                   # questions generated together (left-padded) in batch mode
THINKING = True                                  # False: Qwen3's enable_thinking=False, the answer alone; in the chat,
                                                 # /think or /no_think in a question switches it for that turn
# sampling: Qwen3's thinking-mode defaults
MAX_NEW_TOKENS = 2048                            # replies longer than this are cut (finish_reason "length")
TEMPERATURE = 0.6                                # 0 = greedy; Qwen3 advises against greedy in thinking mode
TOP_P = 0.95                                     # nucleus sampling
TOP_K = 20                                       # sample among the k likeliest tokens
SEED = 42                                        # set before every generate, so answers are reproducible; -1 = not set
# -----------------------------------------------------------------------------

ALIASES = {"-q": "question", "-b": "batch_file", "-o": "output_file", "-s": "scenario", "-c": "adapter_path"}
_BOLD, _DIM, _RESET = "\033[1m", "\033[2m", "\033[0m"


def main(argv=None):
    # ========== 1. Settings: every problem reported before the model loads ==========
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_settings(globals(), argv, aliases=ALIASES)
    if cfg.LIST_SCENARIOS:
        print(scenario_table())
        return None
    mode = pick_mode(cfg, argv)
    stop_on(check_inference_settings(cfg, mode))
    if cfg.ADAPTER_PATH:
        check_adapter_path(cfg.ADAPTER_PATH)
    use_run_settings(cfg)  # the base and prompt the adapter was trained with, unless given here

    # ========== 2. Batch mode: read and check every row first ==========
    items, output_file = None, None
    if mode == "batch":
        items = read_batch_file(cfg.BATCH_FILE, cfg.SCENARIO or None)
        output_file = Path(cfg.OUTPUT_FILE or Path(cfg.BATCH_FILE).with_suffix(".pred.jsonl"))
        check_batch_resume(cfg, output_file)
    cfg.print("inference settings")

    # ========== 3. Base model (bf16, or 4-bit NF4) + the LoRA adapter ==========
    warn_if_cpu(cfg.LOAD_IN_4BIT)
    assistant = MedicalAssistant(cfg.MODEL_PATH, cfg.ADAPTER_PATH or None, cfg.LOAD_IN_4BIT, cfg.SYSTEM_PROMPT,
                                 cfg.THINKING)
    assistant.sampling.update(max_new_tokens=cfg.MAX_NEW_TOKENS, temperature=cfg.TEMPERATURE, top_p=cfg.TOP_P,
                              top_k=cfg.TOP_K, seed=cfg.SEED if cfg.SEED >= 0 else None)
    print(f"loaded {cfg.MODEL_PATH}" + (f" + adapter {cfg.ADAPTER_PATH}" if cfg.ADAPTER_PATH else " (no adapter)")
          + f" on {assistant.model.device}", flush=True)

    # ========== 4. Answer: one question, a batch file, or a chat ==========
    if mode == "question":
        print(f"问题 / question: {cfg.QUESTION.strip()}")
        try:
            return stream_answer(assistant, cfg.QUESTION, cfg.SCENARIO or None)
        except KeyboardInterrupt:
            exit_on_interrupt("interrupted: the answer was stopped")
    if mode == "batch":
        write_settings_beside(cfg, output_file)
        return answer_batch_file(assistant, items, cfg.BATCH_FILE, output_file, cfg.BATCH_SIZE)
    return chat(assistant, cfg.SCENARIO or None)


def pick_mode(cfg, argv) -> str:
    """The mode: "question" with -q, "batch" with -b, else "chat" when stdin is a terminal."""
    asked = any(a in ("-q", "--question") or a.startswith("--question=") for a in argv)
    if asked and cfg.BATCH_FILE:
        raise UserError("error: pass either -q (one question) or -b (a batch file), not both")
    if asked or cfg.QUESTION:
        if not cfg.QUESTION.strip():
            raise UserError("error: the question is empty")
        return "question"
    if cfg.BATCH_FILE:
        return "batch"
    if sys.stdin.isatty():
        return "chat"
    raise UserError('error: nothing to answer: pass -q "question" or -b questions.jsonl '
                    "(the interactive chat needs a terminal on stdin)")


def check_inference_settings(cfg, mode: str) -> list[str]:
    problems = [
        cfg.SCENARIO and cfg.SCENARIO not in SCENARIOS
        and f"unknown scenario {cfg.SCENARIO!r}; valid scenarios: {', '.join(SCENARIOS)}",
        cfg.BATCH_SIZE < 1 and f"batch_size must be at least 1, not {cfg.BATCH_SIZE}",
        cfg.MAX_NEW_TOKENS < 1 and f"max_new_tokens must be at least 1, not {cfg.MAX_NEW_TOKENS}",
        cfg.TEMPERATURE < 0 and f"temperature must be 0 (greedy) or more, not {cfg.TEMPERATURE}",
        not 0 < cfg.TOP_P <= 1 and f"top_p must be in (0, 1], not {cfg.TOP_P}",
        cfg.TOP_K < 0 and f"top_k must be 0 (off) or more, not {cfg.TOP_K}",
        not cfg.MODEL_PATH and "model_path is empty",
        cfg.OUTPUT_FILE and mode != "batch" and "-o/--output_file is only used with -b/--batch_file",
    ]
    if mode == "batch" and cfg.OUTPUT_FILE and Path(cfg.OUTPUT_FILE).resolve() == Path(cfg.BATCH_FILE).resolve():
        problems.append("the output file is the batch file itself; pick another -o")
    return [p for p in problems if p]


def stop_on(problems: list[str]) -> None:
    """One problem is one line; several are listed together."""
    if len(problems) == 1:
        raise UserError(f"error: {problems[0]}")
    check_settings(problems)


# ---------------------------------------------------------------------------------------------------------
# one question and the chat: the reply streamed with its think and answer apart


def stream_answer(assistant: MedicalAssistant, question: str, scenario=None, history=(), out=None):
    """Stream one reply under 思考/回答 headers, then a line with the finish reason and speed; returns the Reply."""
    out = out or sys.stdout
    fancy = out.isatty()
    splitter, section = ThinkAnswerSplitter(), None
    start = time.perf_counter()
    pieces = assistant.stream(question, scenario, history)
    try:
        for piece in pieces:
            for part, text in splitter.feed(piece):
                section = _write_part(out, section, part, text, fancy)
    finally:
        pieces.close()
    for part, text in splitter.close():
        section = _write_part(out, section, part, text, fancy)
    reply, seconds = assistant.last_reply, time.perf_counter() - start
    reason = "stop (end token)" if reply.finish_reason == "stop" else \
        f"length (hit max_new_tokens={assistant.sampling['max_new_tokens']}; the reply is cut off)"
    note = thinking_note(reply, question, history, assistant.thinking)
    speed = f"{reply.new_tokens} new tokens in {seconds:.1f} s, {reply.new_tokens / max(seconds, 1e-9):.1f} tokens/s"
    out.write(("\n" if section else "") + f"[finish: {reason} | " + (f"{note} | " if note else "") + f"{speed}]\n")
    out.flush()
    return reply


def _write_part(out, section, part, text, fancy):
    if part != section:
        header = "==== 思考 / thinking ====" if part == "think" else "==== 回答 / answer ===="
        out.write(("\n" if section else "") + (f"{_RESET}{_BOLD}{header}{_RESET}" if fancy else header) + "\n")
    out.write(f"{_DIM}{text}{_RESET}" if fancy and part == "think" else text)
    out.flush()
    return part


def chat(assistant: MedicalAssistant, scenario=None, read_line=input):
    """A multi-turn chat; earlier turns' thinks are dropped from the history, as Qwen3's template does.

    "/think" or "/no_think" in a question is Qwen3's soft switch: it stays in the question, the model follows
    the most recent one (with THINKING=False it never thinks).
    """
    print("多轮对话 / chat — /reset 清空历史 (clear the history), /exit 或 Ctrl-D 退出 (quit); "
          "问题里加 /no_think 不思考直接回答, /think 思考 (add /no_think or /think to a question to switch thinking)"
          + (f"; scenario {scenario}" if scenario else ""))
    history = []
    while True:
        try:
            question = read_line("\n你 / you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not question:
            continue
        if question == "/exit":
            break
        if question == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if question in (chat_format.THINK_SWITCH, chat_format.NO_THINK_SWITCH):
            print(f"add it to a question, e.g. 什么是高血压？ {question}")
            continue
        if question.startswith("/") and chat_format.thinking_switch(question.split()[0]) is None:
            print("commands: /reset, /exit; /think or /no_think with a question")
            continue
        try:
            reply = stream_answer(assistant, question, scenario, history)
        except KeyboardInterrupt:
            print("\n[interrupted; this turn is not kept]")
            continue
        history.append(history_turn(question, reply))
    return history


# ---------------------------------------------------------------------------------------------------------
# batch mode


# what decides a prediction: a batch output resumed under other values would mix answers of two settings
_PREDICTION_SETTINGS = ("MODEL_PATH", "ADAPTER_PATH", "LOAD_IN_4BIT", "SYSTEM_PROMPT", "SCENARIO", "MAX_NEW_TOKENS",
                        "TEMPERATURE", "TOP_P", "TOP_K", "SEED", "THINKING")


def check_batch_resume(cfg, output_file: Path) -> None:
    """Refuse to add answers made with other settings to an output file that already has some."""
    saved_path = output_file.with_suffix(".settings.json")
    if not output_file.is_file() or not output_file.stat().st_size or not saved_path.is_file():
        return
    saved, new = json.loads(saved_path.read_text(encoding="utf-8")), cfg.as_dict()
    changed = [f"{name.lower()} {saved.get(name)!r} → {new[name]!r}" for name in _PREDICTION_SETTINGS
               if name in saved and saved[name] != new[name]]
    if changed:
        raise UserError(f"error: {output_file} holds answers made with other settings ({', '.join(changed)}); "
                        "pass another -o/--output_file for these settings, or restore the old values to continue it")


def write_settings_beside(cfg, output_file: Path) -> None:
    """OUTPUT.settings.json: the model, adapter and sampling the predictions came from."""
    path = output_file.with_suffix(".settings.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.as_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def answer_batch_file(assistant: MedicalAssistant, items, batch_file, output_file: Path, batch_size: int) -> dict:
    """Answer every row not yet in output_file; each batch is appended and synced at once, so reruns resume."""
    done = finished_ids(output_file)
    todo = [item for item in items if item.id not in done]
    print(f"{len(items)} questions in {batch_file}; {len(items) - len(todo)} already answered in {output_file}; "
          f"answering {len(todo)} in batches of {batch_size}", flush=True)
    start, tokens, batches = time.perf_counter(), 0, (len(todo) + batch_size - 1) // batch_size
    answered = len(items) - len(todo)
    try:
        for n, first in enumerate(range(0, len(todo), batch_size), start=1):
            chunk = todo[first : first + batch_size]
            replies = assistant.ask_batch([item.question for item in chunk], [item.scenario for item in chunk],
                                          system_prompts=[item.system_prompt for item in chunk])
            append_rows(output_file, [prediction_row(item, reply) for item, reply in zip(chunk, replies)])
            answered += len(chunk)
            tokens += sum(reply.new_tokens for reply in replies)
            stopped = sum(reply.finish_reason == "stop" for reply in replies)
            print(f"batch {n}/{batches}: {answered}/{len(items)} answered ({stopped}/{len(chunk)} ended at the end "
                  f"token), {tokens / (time.perf_counter() - start):.1f} tokens/s", flush=True)
    except KeyboardInterrupt:
        answered = len(finished_ids(output_file) & {item.id for item in items})  # rows whole on disk, however late
        exit_on_interrupt(f"interrupted: {answered} of {len(items)} questions are answered in {output_file}; "
                          "run the same command again to answer the rest")
    print(f"wrote {output_file}")
    return {"output_file": str(output_file), "answered": len(todo), "skipped": len(items) - len(todo)}


if __name__ == "__main__":
    main()

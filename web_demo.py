"""Web demo: chat with the fine-tuned model in a browser, its thinking and answer streamed as they come.

    python web_demo.py                                     # then open http://127.0.0.1:7860
    python web_demo.py --adapter_path=output/qwen3-1.7b-qlora-v1/final --load_in_4bit=True
    python web_demo.py --server_port=8080 --max_new_tokens=1024
    ssh -L 7860:127.0.0.1:7860 user@gpu-host               # on your laptop, to reach a demo on a remote GPU host

The page is a thin layer over medsft.assistant.MedicalAssistant: the same prompt, history and sampling as
inference_lora.py's chat. It listens on 127.0.0.1 only unless SERVER_NAME says otherwise. Unless given on the
command line, MODEL_PATH and SYSTEM_PROMPT are those the adapter was trained with (its run's settings.json).
"""
import os
import sys
import threading
import time
import traceback

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo on patient-like questions

import gradio as gr  # noqa: E402

from medsft import chat_format  # noqa: E402
from medsft.assistant import (SCENARIOS, MedicalAssistant, ThinkAnswerSplitter, check_adapter_path,  # noqa: E402
                              history_turn, thinking_note)
from medsft.errors import UserError  # noqa: E402
from medsft.settings import check_settings, parse_settings, use_run_settings  # noqa: E402

# -----------------------------------------------------------------------------
# model
MODEL_PATH = "Qwen/Qwen3-1.7B"                   # the base: a local folder or a model id; default: the adapter's run's
ADAPTER_PATH = "output/qwen3-1.7b-qlora-v3/final"  # OUTPUT_DIR/final of a training run; "" = the bare base model
LOAD_IN_4BIT = False                             # False: bf16 (float32 on CPU); True: 4-bit NF4, for small GPUs
SYSTEM_PROMPT = chat_format.SYSTEM_PROMPT        # the training prompt; a scenario appends its guidance to it
THINKING = True                                  # the page's thinking toggle starts on; off: the answer alone
# sampling: Qwen3's thinking-mode defaults; the page's accordion changes them per turn
MAX_NEW_TOKENS = 2048                            # longest reply (also the slider's maximum); longer ones are cut
TEMPERATURE = 0.6                                # 0 = greedy
TOP_P = 0.95                                     # nucleus sampling
TOP_K = 20                                       # sample among the k likeliest tokens
# limits
CONTEXT_LENGTH = 4096                            # the chat window: prompt + reply tokens; older turns are dropped beyond it
MAX_QUESTION_CHARS = 2000                        # longer questions are refused with a message
QUEUE_SIZE = 16                                  # requests waiting behind the one being answered; more are refused
# server
SERVER_NAME = "127.0.0.1"                        # localhost only; "0.0.0.0" lets anyone on the network in
SERVER_PORT = 7860                               # http://SERVER_NAME:SERVER_PORT
SHARE = False                                    # True: a public *.gradio.live link (anyone with it can use the model)
# -----------------------------------------------------------------------------

_THINK_TITLE = "思考过程 (thinking)"
_DISCLAIMER = ("⚠️ 本演示仅供研究与学习，**不构成医疗建议**，不能代替医生的诊断和治疗。紧急情况请立即拨打 **120**。  \n"
              "For research only, **not medical advice**. In an emergency, call **120**.")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(argv=None):
    # ========== 1. Settings: every problem reported before the model loads ==========
    cfg = parse_settings(globals(), argv)
    check_settings(check_web_settings(cfg))
    use_run_settings(cfg)  # the base and prompt the adapter was trained with, unless given here
    if cfg.SERVER_NAME not in _LOOPBACK:
        print(f"warning: SERVER_NAME={cfg.SERVER_NAME} lets anyone who can reach this machine use the model (and "
              "see nothing stopping them); to reach it from your own computer use SSH port forwarding instead: "
              f"ssh -L {cfg.SERVER_PORT}:127.0.0.1:{cfg.SERVER_PORT} user@this-host", file=sys.stderr, flush=True)
    if cfg.SHARE:
        print("warning: SHARE=True makes a public link: anyone who has it can use the model", file=sys.stderr,
              flush=True)
    cfg.print("web demo settings")

    # ========== 2. Base model + the LoRA adapter ==========
    assistant = MedicalAssistant(cfg.MODEL_PATH, cfg.ADAPTER_PATH or None, cfg.LOAD_IN_4BIT, cfg.SYSTEM_PROMPT)
    assistant.sampling.update(max_new_tokens=cfg.MAX_NEW_TOKENS, temperature=cfg.TEMPERATURE, top_p=cfg.TOP_P,
                              top_k=cfg.TOP_K, seed=None)
    print(f"loaded {cfg.MODEL_PATH}" + (f" + adapter {cfg.ADAPTER_PATH}" if cfg.ADAPTER_PATH else " (no adapter)")
          + f" on {assistant.model.device}", flush=True)

    # ========== 3. The page, served one generation at a time ==========
    demo = build_demo(WebChat(assistant, cfg.CONTEXT_LENGTH, cfg.MAX_QUESTION_CHARS), cfg)
    demo.queue(max_size=cfg.QUEUE_SIZE, default_concurrency_limit=1)
    # quiet: Gradio's own hint says "set share=True in launch()"; here it is --share=True, said below
    demo.launch(server_name=cfg.SERVER_NAME, server_port=cfg.SERVER_PORT, share=cfg.SHARE, ssr_mode=False,
                footer_links=["api"], quiet=True, prevent_thread_lock=True)
    print(f"* Running on local URL:  {demo.local_url}" + ("" if cfg.SHARE else "  (a public link: --share=True; "
          "anyone who has it can use the model)"), flush=True)
    demo.block_thread()


def check_web_settings(cfg) -> list[str]:
    problems = [
        not cfg.MODEL_PATH and "model_path is empty",
        not 0 < cfg.SERVER_PORT < 65536 and f"server_port must be 1-65535, not {cfg.SERVER_PORT}",
        not cfg.SERVER_NAME and "server_name is empty (use 127.0.0.1)",
        cfg.MAX_NEW_TOKENS < 1 and f"max_new_tokens must be at least 1, not {cfg.MAX_NEW_TOKENS}",
        cfg.CONTEXT_LENGTH <= cfg.MAX_NEW_TOKENS
        and f"context_length ({cfg.CONTEXT_LENGTH}) must be more than max_new_tokens ({cfg.MAX_NEW_TOKENS})",
        cfg.TEMPERATURE < 0 and f"temperature must be 0 (greedy) or more, not {cfg.TEMPERATURE}",
        not 0 < cfg.TOP_P <= 1 and f"top_p must be in (0, 1], not {cfg.TOP_P}",
        cfg.TOP_K < 0 and f"top_k must be 0 (off) or more, not {cfg.TOP_K}",
        cfg.MAX_QUESTION_CHARS < 1 and f"max_question_chars must be at least 1, not {cfg.MAX_QUESTION_CHARS}",
        cfg.QUEUE_SIZE < 1 and f"queue_size must be at least 1, not {cfg.QUEUE_SIZE}",
    ]
    if cfg.ADAPTER_PATH:
        try:
            check_adapter_path(cfg.ADAPTER_PATH)
        except UserError as e:
            problems.append(str(e).removeprefix("error: "))
    return [p for p in problems if p]


# ---------------------------------------------------------------------------------------------------------
# one chat turn


class WebChat:
    """The page's callbacks. Each browser session has its own history (a gr.State) and its own Stop."""

    def __init__(self, assistant: MedicalAssistant, context_length: int, max_question_chars: int):
        self.assistant, self.context_length, self.max_question_chars = assistant, context_length, max_question_chars
        self.stop_events: dict[str, threading.Event] = {}

    def respond(self, question, messages, history, scenario, temperature, top_p, max_new_tokens,
                request: gr.Request = None, thinking=True):
        """Yield (textbox, chatbot messages, history) as the reply streams: the thinking, then the answer.

        `history` holds the model's (question, reply) turns, kept as inference_lora.py's chat keeps them.
        `thinking` False (the page's toggle off) asks as Qwen3's enable_thinking=False: the answer alone (Gradio
        passes the request by its annotation, so the toggle's value, the last input, arrives here).
        """
        messages, history = list(messages or []), list(history or [])
        question = (question or "").strip()
        max_new_tokens = int(max_new_tokens)
        if not question:
            yield "", messages + [_note("请输入一个问题。 / Please type a question.")], history
            return
        if len(question) > self.max_question_chars:
            yield question, messages + [_note(
                f"问题太长了（{len(question)} 字），请缩短到 {self.max_question_chars} 字以内。 / The question has "
                f"{len(question)} characters; the limit is {self.max_question_chars}.")], history
            return
        if scenario and scenario not in SCENARIOS:  # the API can send any string
            yield question, messages + [_note(f"unknown scenario {scenario!r}; valid: {', '.join(SCENARIOS)}")], history
            return
        scenario = scenario or None
        thinking = bool(thinking)
        kept, dropped = self.fit_history(question, scenario, history, max_new_tokens, thinking)
        messages.append(gr.ChatMessage(question, role="user"))
        if kept is None:
            too_long = _note(f"这个问题加上回答会超过 {self.context_length} 个 token，请缩短问题或减少最大生成长度。 / "
                             f"The question and a reply of {max_new_tokens} tokens do not fit "
                             f"CONTEXT_LENGTH={self.context_length} tokens.")
            yield "", messages + [too_long], history
            return
        history = kept
        if dropped:
            messages.append(_note(f"对话太长，最早的 {dropped} 轮已被遗忘（上限 {self.context_length} 个 token）。 / "
                                  f"The oldest {dropped} turn(s) were dropped to fit "
                                  f"CONTEXT_LENGTH={self.context_length}."))

        stop = self.stop_events[_session(request)] = threading.Event()
        view = _TurnView()
        start = time.perf_counter()
        pieces = self.assistant.stream(question, scenario, history, stop_event=stop, thinking=thinking,
                                       max_new_tokens=max_new_tokens, temperature=float(temperature),
                                       top_p=float(top_p))
        try:
            splitter = ThinkAnswerSplitter()
            for piece in pieces:
                if view.feed(splitter.feed(piece)):
                    yield "", messages + view.messages(), history
            view.feed(splitter.close())
        except Exception as e:  # a failed generation is told in the chat; the server stays up
            traceback.print_exc()
            yield "", messages + view.messages() + [_note(f"出错了 / error: {type(e).__name__}: {e}")], history
            return
        finally:
            pieces.close()
            self.stop_events.pop(_session(request), None)
        reply = self.assistant.last_reply
        view.finish(_finish_line(reply, time.perf_counter() - start, max_new_tokens,
                                 thinking_note(reply, question, history, thinking)), reply.finish_reason)
        if reply.finish_reason != "stopped":
            history.append(history_turn(question, reply))
        yield "", messages + view.messages(), history

    def fit_history(self, question, scenario, history, max_new_tokens, thinking=True):
        """(the newest turns that fit CONTEXT_LENGTH with the reply, how many were dropped); None when none fit."""
        budget = self.context_length - max_new_tokens
        for dropped in range(len(history) + 1):
            kept = history[dropped:]
            if len(self.assistant.encode(question, scenario, kept, thinking)) <= budget:
                return kept, dropped
        return None, len(history)

    def stop(self, request: gr.Request = None):
        """The Stop button: the generation of this session ends at its next token (a stopping criterion)."""
        event = self.stop_events.get(_session(request))
        if event is not None:
            event.set()

    def new_chat(self, request: gr.Request = None):
        self.stop(request)
        return "", [], []


class _TurnView:
    """The chat messages of the turn being streamed: a folding thinking message, then the answer."""

    def __init__(self):
        self.think, self.answer, self.footer, self.started = "", "", "", time.perf_counter()
        self.no_answer = ""
        self.think_seconds = None

    def feed(self, parts) -> bool:
        for section, text in parts:
            if section == "think":
                self.think += text
            else:
                if self.think_seconds is None:
                    self.think_seconds = time.perf_counter() - self.started
                self.answer += text
        return bool(parts)

    def finish(self, footer: str, finish_reason: str) -> None:
        self.no_answer = {"stop": "（没有回答 / no answer）", "length": "（回答在思考中被截断 / cut off while thinking）",
                          "stopped": "（已停止 / stopped）"}[finish_reason]
        if self.think_seconds is None:
            self.think_seconds = time.perf_counter() - self.started
        self.footer = footer

    def messages(self) -> list:
        done = self.think_seconds is not None
        view = []
        if self.think or not done:
            metadata = {"title": _THINK_TITLE, "status": "done" if done else "pending"}
            if done:
                metadata["duration"] = round(self.think_seconds, 1)
            view.append(gr.ChatMessage(self.think or "…", metadata=metadata))
        if self.answer or self.footer:
            answer = self.answer or self.no_answer
            view.append(gr.ChatMessage(answer + (f"\n\n<sub>{self.footer}</sub>" if self.footer else "")))
        return view


def _finish_line(reply, seconds: float, max_new_tokens: int, note: str = "") -> str:
    reason = {"stop": "stop",
              "length": f"length: cut at max_new_tokens={max_new_tokens}",
              "stopped": "stopped: Stop pressed, this turn is not kept in the history"}[reply.finish_reason]
    return f"{reason} · " + (f"{note} · " if note else "") + \
        f"{reply.new_tokens} tokens · {reply.new_tokens / max(seconds, 1e-9):.1f} tok/s"


def _note(text: str) -> gr.ChatMessage:
    return gr.ChatMessage(f"<sub>{text}</sub>")


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "local"


# ---------------------------------------------------------------------------------------------------------
# the page


def build_demo(chat: WebChat, cfg) -> gr.Blocks:
    """The page: chat, question box, Stop, scenario, new chat, sampling accordion, examples and disclaimer."""
    model = cfg.MODEL_PATH + (f" + {cfg.ADAPTER_PATH}" if cfg.ADAPTER_PATH else " (no adapter)")
    with gr.Blocks(title="medsft 医疗问答演示 / medical assistant demo") as demo:
        gr.Markdown(f"## 医疗问答演示 / Medical assistant demo\n模型 / model: `{model}`\n\n{_DISCLAIMER}")
        chatbot = gr.Chatbot(label="对话 / chat", height=480, buttons=["copy"], feedback_options=None,
                             placeholder="向模型提一个医学问题 / Ask the model a medical question")
        history = gr.State([])
        with gr.Row():
            question = gr.Textbox(placeholder="输入问题，按 Enter 发送 / Type a question, press Enter", lines=1,
                                  max_lines=6, label="问题 / question", show_label=False, scale=6, elem_id="question")
            send = gr.Button("发送 Send", variant="primary", scale=1, min_width=90)
            stop = gr.Button("停止 Stop", variant="stop", scale=1, min_width=90)
        with gr.Row():
            choices = [("无 / none", "")] + [(f"{s.name_zh} / {name}", name) for name, s in SCENARIOS.items()]
            scenario = gr.Dropdown(choices, value="", label="场景 / scenario", scale=3)
            thinking = gr.Checkbox(value=cfg.THINKING, label="思考 / thinking", scale=1, elem_id="thinking",
                                   info="关闭则直接回答 / off: the answer at once")
            new_chat = gr.Button("新对话 / New chat", scale=1)
        with gr.Accordion("采样设置 / sampling", open=False):
            temperature = gr.Slider(0.0, 1.5, value=cfg.TEMPERATURE, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=cfg.TOP_P, step=0.05, label="top_p")
            max_new_tokens = gr.Slider(1, cfg.MAX_NEW_TOKENS, value=cfg.MAX_NEW_TOKENS, step=1,
                                       label="max_new_tokens")
        gr.Examples([[s.example, name] for name, s in SCENARIOS.items()], inputs=[question, scenario],
                    label="示例问题 / examples")

        inputs = [question, chatbot, history, scenario, temperature, top_p, max_new_tokens, thinking]
        outputs = [question, chatbot, history]
        turns = [question.submit(chat.respond, inputs, outputs, api_name="chat", concurrency_limit=1,
                                 concurrency_id="model"),
                 send.click(chat.respond, inputs, outputs, api_visibility="private", concurrency_limit=1,
                            concurrency_id="model")]
        stop.click(chat.stop, None, None, api_visibility="private", queue=False)
        # a new chat also stops the turn being generated, and drops its last update
        new_chat.click(chat.new_chat, None, [question, chatbot, history], api_visibility="private", queue=False,
                       cancels=turns)
        demo.unload(chat.stop)
    return demo


if __name__ == "__main__":
    main()

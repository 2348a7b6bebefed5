"""The medical assistant: a base Qwen3 with a LoRA adapter, asked one question, a batch, or in a chat.

    from medsft.assistant import MedicalAssistant

    assistant = MedicalAssistant("Qwen/Qwen3-1.7B", "output/qwen3-1.7b-qlora-v3/final")
    reply = assistant.ask("我最近头痛，可能是什么原因？", scenario="diagnosis")
    print(reply.think, reply.answer, reply.finish_reason, reply.new_tokens)

    for piece in assistant.stream("如何缓解焦虑情绪？"):   # text as it is generated
        print(piece, end="", flush=True)
    reply = assistant.last_reply                             # the finished Reply

    quick = assistant.ask("什么是高血压？", thinking=False)  # Qwen3's enable_thinking=False: the answer alone

inference_lora.py (the command line, batch files, the chat) and a web demo are built on it.
"""
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from medsft.chat_format import SYSTEM_PROMPT, encode_prompt, format_reply, render_prompt, turn_thinks
from medsft.errors import DataError, UserError, interrupts_held
from medsft.generation import Reply, generate_from_prompts, prepare_for_generation
from medsft.model_loading import adapter_path_hint
from medsft.records import read_jsonl


@dataclass(frozen=True)
class Scenario:
    name_zh: str
    guidance: str  # appended to the training system prompt, never replacing it
    example: str


# the originals' 10 scenarios (medical_assistant.py), with guidance of our own
SCENARIOS = {
    "diagnosis": Scenario(
        "症状诊断", "当前场景：症状诊断。请根据症状分析可能的原因并按可能性排序，说明明确诊断需要做哪些检查，"
        "并指出哪些情况需要尽快就医。", "我最近经常头痛，伴有恶心，这是什么原因？"),
    "treatment": Scenario(
        "治疗方案", "当前场景：治疗方案。请介绍常用的治疗方法及其利弊；药物只说明类别和一般原则，"
        "具体用药和剂量须由医生根据病情决定。", "高血压患者应该如何控制血压？"),
    "prevention": Scenario(
        "疾病预防", "当前场景：疾病预防。请从生活方式、饮食运动、疫苗接种和定期筛查等方面给出具体、可执行的预防建议。",
        "如何预防心血管疾病？"),
    "education": Scenario(
        "医学教育", "当前场景：医学知识科普。请用通俗易懂的语言解释医学概念，必要时举例说明，避免堆砌术语。",
        "什么是高血压？"),
    "emergency": Scenario(
        "紧急评估", "当前场景：紧急情况评估。请先判断是否有危及生命的危险信号；如有，首先明确建议立即拨打120"
        "或到急诊就医，再说明等待救援时的注意事项。", "胸痛持续了3天，需要立即就医吗？"),
    "nutrition": Scenario(
        "营养指导", "当前场景：营养指导。请结合疾病和个人情况给出具体的饮食建议，包括宜吃和少吃的食物及进餐安排。",
        "糖尿病患者应该如何选择食物？"),
    "mental_health": Scenario(
        "心理健康", "当前场景：心理健康。请以温和、共情的语气回应，给出可行的自我调节方法；如有自伤或轻生的念头，"
        "请明确建议立即寻求专业心理援助或拨打心理援助热线。", "如何缓解焦虑情绪？"),
    "pediatric": Scenario(
        "儿科咨询", "当前场景：儿科咨询。请考虑孩子的年龄和体重，儿童用药须按儿童剂量并遵医嘱，不要自行给孩子服用"
        "成人药物，并说明需要立即就医的危险信号。", "儿童发热应该如何处理？"),
    "geriatric": Scenario(
        "老年健康", "当前场景：老年健康。请考虑老年人常见的多病共存、多重用药和跌倒风险，建议要简单、安全、易于执行。",
        "老年人如何预防跌倒？"),
    "women_health": Scenario(
        "女性健康", "当前场景：女性健康。请关注月经、妊娠、哺乳和更年期等不同阶段的特点，涉及用药时说明孕期和哺乳期的注意事项。",
        "更年期症状如何缓解？"),
}

# Qwen3's thinking-mode sampling; seed: transformers.set_seed before every generate (None: not reseeded)
DEFAULT_SAMPLING = {"max_new_tokens": 2048, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "seed": None}


def check_scenario(name: str | None) -> str | None:
    """The scenario name, or None for none; an unknown name stops with the valid ones."""
    if not name:
        return None
    if name not in SCENARIOS:
        raise UserError(f"error: unknown scenario {name!r}; valid scenarios: {', '.join(SCENARIOS)}")
    return name


def scenario_system_prompt(scenario: str | None, system_prompt: str = SYSTEM_PROMPT) -> str:
    """The training system prompt, plus the scenario's guidance on a new line."""
    scenario = check_scenario(scenario)
    return system_prompt if scenario is None else system_prompt + "\n" + SCENARIOS[scenario].guidance


def scenario_table() -> str:
    from medsft.console import text_table

    return text_table(["name", "场景", "example question"], [[name, s.name_zh, s.example] for name, s in SCENARIOS.items()])


def history_turn(question: str, reply: Reply) -> tuple[str, str]:
    """One finished turn for the chat history, as Qwen3 keeps it.

    Qwen3's template drops an earlier reply's think only when the reply has its </think>; a reply cut off
    inside its think (finish_reason "length") is closed here so its think is dropped too.
    """
    return question, reply.text if "</think>" in reply.text else format_reply(reply.think, reply.answer)


def thinking_note(reply: Reply, question: str, history=(), thinking: bool = True) -> str:
    """For a finish line: "no thinking" when the turn asked for none (the THINKING switch, or /no_think) and got
    none; "thought anyway" when the model thought all the same; "" for a turn that thinks."""
    if turn_thinks(question, history, thinking):
        return ""
    return "no thinking" if not reply.think else "thought anyway"


# ---------------------------------------------------------------------------------------------------------
# loading


def check_adapter_path(adapter_path) -> None:
    path = Path(adapter_path)
    if not path.exists():
        hint = "train one (python train_lora3.py), or pass --adapter_path= (empty) for the bare base model"
        raise UserError(f"error: adapter path {str(path)!r} not found; {hint}")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"error: adapter path {str(path)!r} has no adapter_config.json, so it is not a LoRA "
                        f"adapter{adapter_path_hint(path)}")


def load_model(base_model_path: str, adapter_path=None, load_in_4bit: bool = False):
    """(model, tokenizer): the base Qwen3 in bf16 (4-bit NF4 if asked) with the adapter on it, ready to generate.

    `base_model_path` is a local folder or a model id (downloaded once, as training does). On CPU a bf16
    model is cast to float32: bf16 matmuls are slow there, and the adapter was trained against float32 on
    CPU. A 4-bit model keeps its bf16 compute dtype.
    """
    import torch

    from medsft.model_loading import load_base_model, load_tokenizer, resolve_model_path

    if adapter_path:
        check_adapter_path(adapter_path)
    base_model_path = resolve_model_path(str(base_model_path))
    tokenizer = load_tokenizer(base_model_path)
    model = load_base_model(base_model_path, load_in_4bit)
    if not load_in_4bit and model.device.type == "cpu":
        model.to(torch.float32)
    if adapter_path:
        model = attach_adapter(model, adapter_path, base_model_path)
    prepare_for_generation(model)
    return model, tokenizer


def attach_adapter(model, adapter_path, base_model_path="the base model"):
    """peft.PeftModel.from_pretrained(model, adapter_path), with a clear error when the adapter does not fit."""
    import torch
    from peft import PeftModel

    check_adapter_path(adapter_path)
    try:
        return PeftModel.from_pretrained(model, str(adapter_path))
    except (RuntimeError, ValueError) as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        detail = _first_line(e)
        if "size mismatch" in detail or "not found in the base model" in detail:
            raise UserError(f"error: the adapter in {adapter_path} does not match the base model {base_model_path} "
                            f"({_adapter_base(adapter_path)}{detail}); pass the base it was trained on with "
                            "--model_path") from None
        raise UserError(f"error: could not load the adapter in {adapter_path} onto {base_model_path}: "
                        f"{detail}") from None


def _adapter_base(adapter_path) -> str:
    try:
        base = json.loads((Path(adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))
        return f"it was made for {base['base_model_name_or_path']}: " if base.get("base_model_name_or_path") else ""
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# which size of the base each LoRA matrix's outer side has (Qwen3's attention and MLP projections)
_LORA_SIZES = {**{("A", m): "hidden_size" for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
               ("B", "o_proj"): "hidden_size", ("B", "down_proj"): "hidden_size", ("A", "down_proj"): "intermediate_size",
               ("B", "gate_proj"): "intermediate_size", ("B", "up_proj"): "intermediate_size"}
_SHAPE_NAMES = {"hidden_size": "hidden size", "intermediate_size": "intermediate size", "num_hidden_layers": "layers"}


def check_base_shape(model_path, adapter_path, trained_base: str) -> None:
    """Refuse, before anything loads, a base whose layers are not the shape the adapter was trained on.

    The adapter's LoRA matrices give the shape of its base (read from the safetensors header, no weights);
    the base's config.json gives its own. A model id (not yet downloaded) is left to PEFT's check at load.
    """
    config_path, weights = Path(model_path) / "config.json", Path(adapter_path) / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        return
    try:
        from safetensors import safe_open

        config = json.loads(config_path.read_text(encoding="utf-8"))
        with safe_open(str(weights), framework="pt") as f:
            trained = lora_base_shape({key: f.get_slice(key).get_shape() for key in f.keys()})
    except (OSError, ValueError, RuntimeError):
        return
    if any(name in config and config[name] != value for name, value in trained.items()):  # else: the folder check
        def shape(values):
            return ", ".join(f"{label} {values.get(name)}" for name, label in _SHAPE_NAMES.items() if name in trained)

        raise UserError(f"error: --model_path {model_path} ({shape(config)}) is not the shape of {trained_base} "
                        f"({shape(trained)}), the base the adapter in {adapter_path} was trained on; drop "
                        "--model_path to use the run's base, or pass a copy of it")


def lora_base_shape(shapes: dict) -> dict:
    """{hidden_size, intermediate_size, num_hidden_layers} of the base, from an adapter's LoRA matrix shapes."""
    found = {}
    for key, dims in shapes.items():
        match = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight$", key)
        if not match or len(dims) != 2:
            continue
        layer, module, side = int(match[1]), match[2], match[3]
        found["num_hidden_layers"] = max(found.get("num_hidden_layers", 0), layer + 1)
        size = dims[1] if side == "A" else dims[0]  # lora_A is [r, in], lora_B is [out, r]
        if (side, module) in _LORA_SIZES:
            found[_LORA_SIZES[side, module]] = size
    return found


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    detail = next((line for line in lines if line.startswith("size mismatch")), first)
    return detail if len(detail) <= 240 else detail[:237] + "..."


# ---------------------------------------------------------------------------------------------------------
# the assistant


class MedicalAssistant:
    """Ask a fine-tuned Qwen3 medical questions; every answer is a Reply (think, answer, finish_reason, ...).

    Sampling settings (max_new_tokens, temperature, top_p, top_k, seed) default to `self.sampling` and can be
    given per call; any other keyword argument goes to model.generate (e.g. logits_processor). `thinking`
    (default `self.thinking`) False renders Qwen3's enable_thinking=False prompt: the reply is the answer alone.
    """

    def __init__(self, base_model_path: str, adapter_path=None, load_in_4bit: bool = False,
                 system_prompt: str = SYSTEM_PROMPT, thinking: bool = True):
        self.model, self.tokenizer = load_model(base_model_path, adapter_path, load_in_4bit)
        self.system_prompt, self.thinking = system_prompt, thinking
        self.sampling = dict(DEFAULT_SAMPLING)
        self.last_reply: Reply | None = None  # set when a stream() finishes

    def render(self, question: str, scenario: str | None = None, history=(), thinking: bool | None = None) -> str:
        """The exact prompt the model sees, the same rendering training used."""
        return render_prompt(self.tokenizer, question, scenario_system_prompt(scenario, self.system_prompt), history,
                             self.thinking if thinking is None else thinking)

    def encode(self, question: str, scenario: str | None = None, history=(),
               thinking: bool | None = None, system_prompt: str | None = None) -> list[int]:
        """The token ids of render()'s prompt; the question and history are plain text, never control tokens.
        `system_prompt` (a batch row's own) replaces `self.system_prompt` for this question."""
        return encode_prompt(self.tokenizer, question, scenario_system_prompt(scenario, system_prompt or self.system_prompt),
                             history, self.thinking if thinking is None else thinking)

    def ask(self, question: str, scenario: str | None = None, history=(), thinking: bool | None = None,
            **sampling) -> Reply:
        return self.generate([self.encode(_checked(question), scenario, history, thinking)], **sampling)[0]

    def ask_batch(self, questions, scenarios=None, histories=None, thinking: bool | None = None,
                  system_prompts=None, **sampling) -> list[Reply]:
        """Replies to several questions at once (one left-padded batch); scenarios, histories and system prompts
        (None: self.system_prompt) are per question."""
        scenarios = scenarios or [None] * len(questions)
        histories = histories or [()] * len(questions)
        system_prompts = system_prompts or [None] * len(questions)
        if not len(questions) == len(scenarios) == len(histories) == len(system_prompts):
            raise ValueError("questions, scenarios, histories and system prompts must have the same length")
        return self.generate([self.encode(_checked(q), s, h, thinking, p)
                              for q, s, h, p in zip(questions, scenarios, histories, system_prompts)], **sampling)

    def stream(self, question: str, scenario: str | None = None, history=(), stop_event=None,
               thinking: bool | None = None, **sampling):
        """Yield the reply's text as it is generated; when the iterator ends, `self.last_reply` holds the Reply.

        The text includes the <think> and </think> tags (ThinkAnswerSplitter tells the parts apart). Closing
        the iterator early (e.g. Ctrl-C) stops the generation; so does setting `stop_event` (a
        threading.Event, e.g. a web page's Stop button), after which the Reply's finish_reason is "stopped".
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        prompt = self.encode(_checked(question), scenario, history, thinking)
        self.last_reply = None
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        result = {}

        def run():
            try:
                criteria = StoppingCriteriaList([_StopWhenSet(stop, stop_event)])
                result["replies"] = self.generate([prompt], streamer=streamer, stopping_criteria=criteria, **sampling)
            except BaseException as e:  # re-raised in the caller's thread
                result["error"] = e
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        self.last_reply = result["replies"][0]
        if stop_event is not None and stop_event.is_set() and self.last_reply.finish_reason == "length":
            self.last_reply.finish_reason = "stopped"

    def generate(self, prompts: list[list[int]], streamer=None, **options) -> list[Reply]:
        """Replies to prompts from encode() (left-padded batch), cut at <|im_end|> or <|endoftext|>."""
        settings = self.sampling | {k: options.pop(k) for k in list(options) if k in DEFAULT_SAMPLING}
        return generate_from_prompts(self.model, self.tokenizer, prompts, streamer=streamer, **settings, **options)


def _checked(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise UserError("error: the question is empty")
    return question.strip()


class _StopWhenSet:
    """A stopping criterion that ends generation once one of its events is set (the reader went away, or Stop)."""

    def __init__(self, *events):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class ThinkAnswerSplitter:
    """Splits streamed reply text into ("think", text) and ("answer", text) parts as it arrives.

    Tags split across pieces are held back until they are complete, and the newlines the template puts
    around them are dropped, so the parts are exactly the think and the answer.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self):
        self.section = None  # None: before the reply starts; then "think" or "answer"
        self.pending = ""
        self.at_start = True  # strip leading newlines of a section

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.pending += piece
        parts = []
        while self.pending:
            if self.section is None:
                text = self.pending.lstrip()
                if not text or (self.OPEN.startswith(text) and text != self.OPEN):
                    return parts  # may still become <think>
                if text.startswith(self.OPEN):
                    self.section, self.pending = "think", text[len(self.OPEN):]
                else:
                    self.section, self.pending = "answer", text
                self.at_start = True
            elif self.section == "think":
                end = self.pending.find(self.CLOSE)
                if end >= 0:
                    self._emit(parts, self.pending[:end].rstrip())
                    self.section, self.pending, self.at_start = "answer", self.pending[end + len(self.CLOSE):], True
                    continue
                hold = _partial_tag_length(self.pending, self.CLOSE)
                body = self.pending[: len(self.pending) - hold]
                kept = body.rstrip()  # trailing whitespace may be the template's newline before </think>
                self._emit(parts, kept)
                self.pending = body[len(kept):] + self.pending[len(self.pending) - hold:]
                return parts
            else:
                self._emit(parts, self.pending)
                self.pending = ""
        return parts

    def close(self) -> list[tuple[str, str]]:
        """The rest once the stream has ended (a reply cut off inside its think ends in the think)."""
        parts = []
        if self.section is None and self.pending.strip():
            self.section = "answer"
        if self.section:
            self._emit(parts, self.pending.rstrip())
        self.pending = ""
        return parts

    def _emit(self, parts: list, text: str) -> None:
        if self.at_start:
            text = text.lstrip()
        if text:
            self.at_start = False
            parts.append((self.section, text))


def _partial_tag_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is the start of `tag` (a tag split across pieces)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------------------------------------
# batch files

OUTPUT_FIELDS = ("id", "question", "think", "answer", "output", "finish_reason", "new_tokens")


@dataclass
class BatchItem:
    line: int
    id: str
    question: str
    scenario: str | None
    row: dict  # the input row, whose other fields are copied to the output
    system_prompt: str | None = None  # the row's own (evaluate.py passes a val row's), else the command line's


def read_batch_file(path, scenario: str | None = None) -> list[BatchItem]:
    """The questions of a .jsonl file, checked before any model loads.

    Rows have `question`, optional `id` (default "line-N", stable across reruns), `scenario` and
    `system_prompt` (each overrides the command line's). Bad JSON, an empty question, a duplicate id or an unknown scenario stops with the
    file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"error: batch file {str(path)!r} not found")
    items, seen = [], {}
    for line, row in read_jsonl(path):
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(path, line, "the question is missing or empty")
        item_id = str(row["id"]) if row.get("id") not in (None, "") else f"line-{line}"
        if item_id in seen:
            raise DataError(path, line, f"duplicate id {item_id!r} (first on line {seen[item_id]})")
        seen[item_id] = line
        row_scenario = row.get("scenario") or scenario
        if row_scenario and (not isinstance(row_scenario, str) or row_scenario not in SCENARIOS):
            raise DataError(path, line, f"unknown scenario {row_scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
        system_prompt = row.get("system_prompt")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise DataError(path, line, "system_prompt must be a string")
        items.append(BatchItem(line, item_id, question.strip(), row_scenario or None, row, system_prompt or None))
    return items


def finished_ids(path) -> set[str]:
    """Ids already answered in an output file; an incomplete last line (a crash mid-write) is removed."""
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"note: removed an incomplete last line from {path} (the previous run stopped mid-write)")
    return {str(row["id"]) for _, row in read_jsonl(path) if "id" in row}


def prediction_row(item: BatchItem, reply: Reply) -> dict:
    """The output row: id, question, scenario (if any), the input's other fields, then the reply.

    An input field named like a reply field (a reference `think` or `answer`, as in val.jsonl) is kept as
    `input_<name>` rather than overwritten.
    """
    row = {"id": item.id, "question": item.question}
    if item.scenario:
        row["scenario"] = item.scenario
    for key, value in item.row.items():
        if key not in row:
            row[f"input_{key}" if key in OUTPUT_FIELDS else key] = value
    row |= {"think": reply.think, "answer": reply.answer, "output": reply.text,
            "finish_reason": reply.finish_reason, "new_tokens": reply.new_tokens}
    return row


def append_rows(path, rows: list[dict]) -> None:
    """Append rows and make them durable at once, so a crash later loses nothing written here; a Ctrl-C during the
    write waits until the rows are whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupts_held(), open(path, "a", encoding="utf-8", newline="\n") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())

"""The data schemas data.py reads, each a small reader that yields the one internal row.

The internal row is single-turn `{"instruction", "question", "think", "answer", "metrics", "meta"}` (think ""
for a reply without reasoning) or multi-turn `{"messages": [{"role", "content", "think"?}, ...], "meta"}`.
Everything after a reader is schema-blind. As in LLaMA-Factory's dataset_info.json, an unknown layout is read
with a column mapping: --columns=question:Question,think:Complex_CoT,answer:Response.
"""
import difflib
import re

from medsft.chat_format import clean_think, normalise_text
from medsft.errors import UserError

# source columns that hold reasoning: never silently left out (compared lower-case, without _ - and spaces)
REASONING_NAMES = {"think", "thinking", "thought", "thoughts", "reasoning", "reasoningcontent", "cot",
                   "complexcot", "chainofthought", "rationale", "思考", "思考过程", "推理", "推理过程", "思维链"}
MAPPABLE_FIELDS = ("question", "think", "answer", "system", "meta")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "system": "system"}


class RowProblem(Exception):
    """A bad row: `reason` is the manifest's key for it, `message` the line the user reads."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


# ---------------------------------------------------------------------------------------------------------
# readers: raw row -> internal row (RowProblem for a bad row)


def text_field(raw: dict, column: str, required: bool = True) -> str:
    """The string in `column` ("" when absent and not required)."""
    value = raw.get(column)
    if value is None and not required:
        return ""
    if value is None:
        raise RowProblem(f"missing_{column}", f"missing field '{column}'")
    if not isinstance(value, str):
        raise RowProblem(f"bad_type_{column}", f"field '{column}' must be a string, got {type(value).__name__}")
    return value


def split_think(text: str, column: str) -> tuple[str, str]:
    """(think, answer) of a text that may hold `<think>…</think>` before the answer (the opening tag optional)."""
    if "</think>" in text:
        think, answer = text.split("</think>", 1)
        return clean_think(think), normalise_text(answer)
    if text.lstrip().startswith("<think>"):
        raise RowProblem(f"unclosed_think_{column}", f"field '{column}' opens <think> but never closes it")
    return "", normalise_text(text)


def single_turn(raw: dict, question: str, answer_column: str, think_column: str | None = None,
                system: str = "", question_column: str = "question") -> dict:
    """The internal single-turn row; the answer field may carry the think as `<think>…</think>`."""
    think = clean_think(text_field(raw, think_column)) if think_column else ""
    inline_think, answer = split_think(text_field(raw, answer_column), answer_column)
    if inline_think and think:
        raise RowProblem(f"two_thinks_{answer_column}", f"field '{answer_column}' holds a <think> block and "
                         f"'{think_column}' holds another; keep one")
    think = think or inline_think
    if think_column and not think:
        raise RowProblem(f"empty_{think_column}", f"field '{think_column}' is empty")
    for column, value in ((question_column, normalise_text(question)), (answer_column, answer)):
        if not value:
            raise RowProblem(f"empty_{column}", f"field '{column}' is empty")
    metrics, meta = raw.get("metrics"), raw.get("meta")
    if metrics is not None and not isinstance(metrics, dict):
        raise RowProblem("bad_type_metrics", f"field 'metrics' must be an object, got {type(metrics).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise RowProblem("bad_type_meta", f"field 'meta' must be an object, got {type(meta).__name__}")
    row = {"instruction": normalise_text(system), "question": normalise_text(question), "think": think,
           "answer": answer, "metrics": metrics or {}}
    return row | ({"meta": meta} if meta else {})


def read_question_think_answer(raw: dict) -> dict:
    instruction = raw.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise RowProblem("bad_type_instruction",
                         f"field 'instruction' must be a string, got {type(instruction).__name__}")
    return single_turn(raw, text_field(raw, "question"), "answer", "think", instruction or "")


def read_gradio_seed(raw: dict) -> dict:
    """instruction = the system prompt, input = the question, output = <think>…</think> and the answer; meta kept."""
    return single_turn(raw, text_field(raw, "input"), "output", None, text_field(raw, "instruction", required=False),
                       question_column="input")


def read_alpaca(raw: dict) -> dict:
    """The question is instruction, plus a newline and input when that is not empty; the system prompt is ours."""
    question, extra = text_field(raw, "instruction"), text_field(raw, "input", required=False).strip()
    return single_turn(raw, question + ("\n" + extra if extra else ""), "output", question_column="instruction")


def read_medical_o1(raw: dict) -> dict:
    """FreedomIntelligence/medical-o1-reasoning-SFT: Question, Complex_CoT, Response."""
    return single_turn(raw, text_field(raw, "Question"), "Response", "Complex_CoT", question_column="Question")


def mapped_reader(mapping: dict):
    """A reader for --columns: {internal field: source column}."""
    def read(raw: dict) -> dict:
        system = text_field(raw, mapping["system"], required=False) if "system" in mapping else ""
        meta = raw.get(mapping.get("meta", "meta"))
        if meta is not None and not isinstance(meta, dict):  # meta:department gives {"department": ...}
            meta = {mapping["meta"]: meta}
        row = single_turn(raw | {"meta": meta}, text_field(raw, mapping["question"]), mapping["answer"],
                          mapping.get("think"), system, question_column=mapping["question"])
        return row
    return read


def read_sharegpt(raw: dict) -> dict:
    """`conversations`: [{"from": "human"|"gpt"|"system", "value": ...}], and an optional top-level `system`."""
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowProblem("bad_conversations", "field 'conversations' must be a non-empty list of turns")
    messages = [{"role": "system", "content": text_field(raw, "system")}] if raw.get("system") else []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RowProblem("bad_turn", f"conversations turn {i} must be an object with a string 'value'")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise RowProblem("unsupported_role", f"conversations turn {i}: role {turn.get('from')!r} is not "
                             f"supported (use {', '.join(SHAREGPT_ROLES)})")
        messages.append(_message(role, turn["value"], turn.get("reasoning_content"), f"conversations turn {i}"))
    return conversation(messages, raw)


def read_openai(raw: dict) -> dict:
    """`messages`: [{"role": "system"|"user"|"assistant", "content": ..., "reasoning_content"?: ...}]."""
    turns = raw.get("messages")
    if not isinstance(turns, list) or not turns:
        raise RowProblem("bad_messages", "field 'messages' must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowProblem("bad_turn", f"messages item {i} must be an object")
        content = turn.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]: the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if turn.get("role") not in ("system", "user", "assistant") or not isinstance(content, str):
            raise RowProblem("unsupported_role" if isinstance(content, str) else "bad_turn",
                             f"messages item {i}: needs role system, user or assistant and a text content")
        messages.append(_message(turn["role"], content, turn.get("reasoning_content"), f"messages item {i}"))
    return conversation(messages, raw)


def _message(role: str, content: str, reasoning, where: str) -> dict:
    if role != "assistant":
        return {"role": role, "content": normalise_text(content)}
    think, answer = split_think(content, where)
    if isinstance(reasoning, str) and reasoning.strip():
        if think:
            raise RowProblem("two_thinks", f"{where}: reasoning_content and a <think> block; keep one")
        think = clean_think(reasoning)
    return {"role": "assistant", "content": answer, "think": think}


def conversation(messages: list[dict], raw: dict) -> dict:
    """A checked conversation: an optional system message, then user and assistant turns in turn, ending with
    an assistant reply."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body or body[-1]["role"] != "assistant":
        raise RowProblem("no_final_reply", "the conversation must end with an assistant reply")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RowProblem("turn_order", f"turn {i + 1} is {message['role']}, expected {expected} "
                             "(user and assistant take turns after one optional system message)")
        if not message["content"]:
            raise RowProblem(f"empty_{expected}_turn", f"turn {i + 1} ({expected}) is empty")
    meta = raw.get("meta")
    return {"messages": messages} | ({"meta": meta} if isinstance(meta, dict) and meta else {})


# ---------------------------------------------------------------------------------------------------------
# the schemas: name -> (reader, columns it needs, columns it reads, how it is recognised)

SCHEMAS = {
    "question_think_answer": (read_question_think_answer, ("question", "think", "answer"),
                              ("question", "think", "answer", "instruction", "metrics", "meta")),
    "gradio_seed": (read_gradio_seed, ("input", "output"), ("instruction", "input", "output", "meta", "metrics")),
    "alpaca": (read_alpaca, ("instruction", "output"), ("instruction", "input", "output", "metrics", "meta")),
    "medical_o1": (read_medical_o1, ("Question", "Complex_CoT", "Response"),
                   ("Question", "Complex_CoT", "Response", "metrics", "meta")),
    "sharegpt": (read_sharegpt, ("conversations",), ("conversations", "system", "meta")),
    "openai": (read_openai, ("messages",), ("messages", "meta")),
}


def detect_schema(columns: set) -> str | None:
    """The schema a file's columns say it is in (None: unknown)."""
    if "messages" in columns:
        return "openai"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "gradio_seed" if "meta" in columns and "input" in columns else "alpaca"
    if {"Question", "Response"} <= columns:
        return "medical_o1"
    if {"question", "answer"} <= columns:
        return "question_think_answer"
    return None


def parse_columns(text: str) -> tuple[dict, list[str]]:
    """({field: column}, problems) of --columns=question:Question,think:Complex_CoT,answer:Response."""
    mapping, problems = {}, []
    for item in filter(None, (part.strip() for part in text.split(","))):
        field, sep, column = (s.strip() for s in item.partition(":"))
        if not sep or not column or field not in MAPPABLE_FIELDS:
            problems.append(f"columns item {item!r}: expected FIELD:COLUMN with FIELD one of "
                            f"{', '.join(MAPPABLE_FIELDS)}")
        else:
            mapping[field] = column
    if mapping and not problems and not {"question", "answer"} <= set(mapping):
        problems.append("columns must map at least question and answer, e.g. "
                        "--columns=question:Question,think:Complex_CoT,answer:Response")
    return mapping, problems


def reader_for(path, columns: set, schema: str, mapping: dict | None):
    """(schema name, reader) for one file, after its column checks; each problem is one line naming the column."""
    if mapping:
        name, reader, needed = "columns", mapped_reader(mapping), [mapping[f] for f in ("question", "think", "answer")
                                                                   if f in mapping]
        reads = set(mapping.values()) | {"metrics", "meta"}
    else:
        name = detect_schema(columns) if schema == "auto" else schema
        if name is None:
            raise UserError(f"error: {path}: unknown schema; found the keys {', '.join(sorted(columns)) or '(none)'}; "
                            f"known schemas: {', '.join(SCHEMAS)}{_closest_schema(columns)} (pass --schema=NAME, or "
                            f"map the columns: {_suggest_columns(columns, '', _reasoning_column(columns))})")
        reader, needed, reads = SCHEMAS[name][0], SCHEMAS[name][1], set(SCHEMAS[name][2])
    for column in needed:
        if column not in columns:
            close = difflib.get_close_matches(column, sorted(columns), n=1, cutoff=0.5)
            raise UserError(f"error: {path}: no column '{column}' (schema {name}); columns found: "
                            f"{', '.join(sorted(columns))}" + (f"; closest: '{close[0]}'" if close else "")
                            + _mapping_hint(columns, name))
    unread = [c for c in sorted(columns - reads) if _looks_like_reasoning(c)]
    if unread and not mapping:
        raise UserError(f"error: {path}: column '{unread[0]}' looks like reasoning but schema {name} does not read "
                        f"it; map it: {_suggest_columns(columns, name, unread[0])}")
    return name, reader


# the keys each conversation schema reads in its turns: (list column, {key: what it holds})
TURN_KEYS = {"sharegpt": ("conversations", ("from", "value")), "openai": ("messages", ("role", "content"))}


def check_turn_keys(path, name: str, raws) -> None:
    """A turn key that no turn of the file has is a schema problem, not one per row: one line naming the key
    the turns have instead and the one expected."""
    if name not in TURN_KEYS:
        return
    column, expected = TURN_KEYS[name]
    turns = [turn for _, raw in raws if isinstance(raw.get(column), list) for turn in raw[column]
             if isinstance(turn, dict)]
    if not turns:
        return
    keys = set().union(*(turn.keys() for turn in turns))
    for key in expected:
        if key in keys:
            continue
        unknown = sorted(k for k in keys - set(expected) - {"reasoning_content"}
                         if all(k in turn for turn in turns))
        found = difflib.get_close_matches(key, unknown, n=1, cutoff=0.0) if len(unknown) > 1 else unknown
        instead = f"they have '{found[0]}' instead" if found else f"their keys: {', '.join(sorted(keys))}"
        rename = f"rename '{found[0]}' to '{key}'" if found else f"give each turn a '{key}'"
        raise UserError(f"error: {path}: schema {name}: no turn in '{column}' has the key '{key}' ({instead}); "
                        f"{rename} in every turn (turn keys have no --columns mapping)")


def _closest_schema(columns: set) -> str:
    """"; closest: ..." naming the known schema whose needed columns the found ones nearly match, if any."""
    best = (0, "", [])
    for name, (_, needed, _) in SCHEMAS.items():
        pairs = [(c, close[0]) for c in needed if c not in columns
                 for close in [difflib.get_close_matches(c, sorted(columns), n=1, cutoff=0.6)] if close]
        matched = sum(c in columns for c in needed) + len(pairs)
        if pairs and matched == len(needed) and matched > best[0]:
            best = (matched, name, pairs)
    if not best[1]:
        return ""
    return f"; closest: {best[1]}, with " + ", ".join(f"'{found}' for '{c}'" for c, found in best[2])


def _reasoning_column(columns: set) -> str | None:
    return next((c for c in sorted(columns) if _looks_like_reasoning(c)), None)


def _guess(columns: set, default: str, names: tuple, placeholder: str) -> str:
    """The column that most likely plays a part: the schema's own, a usual name, a near miss, else a placeholder."""
    lowered = {c.lower(): c for c in sorted(columns)}
    for name in (default, *names):
        if name.lower() in lowered:
            return lowered[name.lower()]
    close = difflib.get_close_matches(default, sorted(columns), n=1, cutoff=0.6)
    return close[0] if close else f"{placeholder}_COLUMN"


def _looks_like_reasoning(column: str) -> bool:
    return re.sub(r"[\s_\-]", "", column).lower() in REASONING_NAMES


def _mapping_hint(columns: set, name: str) -> str:
    think = _reasoning_column(columns)
    return f"; or map them: {_suggest_columns(columns, name, think)}" if think else ""


def _suggest_columns(columns: set, name: str, think: str | None) -> str:
    question = {"gradio_seed": "input", "alpaca": "instruction", "medical_o1": "Question"}.get(name, "question")
    answer = {"gradio_seed": "output", "alpaca": "output", "medical_o1": "Response"}.get(name, "answer")
    question = _guess(columns, question, ("question", "prompt", "query", "instruction", "input", "问题"), "QUESTION")
    answer = _guess(columns, answer, ("answer", "response", "output", "reply", "completion", "回答"), "ANSWER")
    return f"--columns=question:{question}" + (f",think:{think}" if think else "") + f",answer:{answer}"


# ---------------------------------------------------------------------------------------------------------
# what the rest of the project asks of a row, whatever its schema


def opening_question(row: dict) -> str:
    """The question of a single-turn row, or the first user turn of a conversation (its de-duplication key)."""
    if "messages" in row:
        return next(m["content"] for m in row["messages"] if m["role"] == "user")
    return row["question"]


def replies(row: dict) -> list[dict]:
    """The assistant replies of a row as {think, answer}: one for a single-turn row."""
    if "messages" in row:
        return [{"think": m["think"], "answer": m["content"]} for m in row["messages"] if m["role"] == "assistant"]
    return [{"think": row["think"], "answer": row["answer"]}]


def expand_conversation(row: dict) -> list[dict]:
    """One row per trained reply: a conversation gives the prefix up to each assistant turn (same id and meta)."""
    if "messages" not in row:
        return [row]
    ends = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    return [row | {"messages": row["messages"][: end + 1], "turn": k} for k, end in enumerate(ends)]

"""Which option letters a written reply chooses: the one answer reader for exams and rewards.

    read_answer("<think>B超提示…</think>\n首选B超检查。答案：A")   # frozenset({'A'})
    read_answer("<think>先看A选项…")                                 # None: cut off while thinking
    is_correct("<think>…</think>\n故选A、C", "CA")                    # True: the sets are equal

Rules, in order:
1. Only the text after the LAST `</think>` is read. A reply with no `</think>` was cut off while thinking and
   has no answer, whatever its think says.
2. The LAST explicit answer statement wins: 答案是/答案为/答案：/正确答案/最终答案/故选/应选/选/选择 (and
   "Answer:"), followed by one or more letters. Markdown bold, full-width letters and full-width punctuation
   are read as their plain forms, so "**答案：Ｃ**" is C.
3. A letter that is part of a word is not an answer: B超, 维生素B12, A型, C反应蛋白, "A选项错误" (no statement
   word before it), "不选A" (negated).
4. Only when no statement is found: a last line that holds nothing but the letters ("B", "**(B)**", "A、C").
5. Several letters ("ABD", "A、B、D", "A和C") are read as a set, for multiple-answer questions.
None means "unparsed": nothing readable; exams count it as wrong and report its share.
"""
import re
import unicodedata

THINK_END = "</think>"

# What may follow an answer's letters: the end, punctuation or space, or a word that says "this option is it".
# Anything else (超, 型, 12, 反应, a Latin letter) means the letter belongs to a name, as in B超 or 维生素B12.
_AFTER_LETTERS = r"(?=$|[^\w]|_|项|选项|是|为|正确|最|符合|均|都|对|即|这)"
_SEPARATOR = r"[ \t]*(?:[、,/&+]|和|与|及|以及|或)?[ \t]*"  # on one line
# Words that state the answer, then the words that may stand between them and the letters.
_STATEMENT = (r"(?:(?:最终|正确|标准|参考|本题(?:的)?|此题(?:的)?)?答案"
              r"|(?:正确|最佳|最终|应选)选项"
              r"|(?<!不)(?<!不应)(?<!不能)(?<!不可)(?<!排除)选择?(?!项|题)"
              r"|(?<![A-Za-z])(?i:answer)(?:\s+is)?"
              r"|(?<![\w])答(?=\s*:))")
_LINK = r"(?:\s|应该是|应该为|应当是|应当为|应是|应为|就是|可能是|是|为|选择|选|:|选项|[(\[【「“\"'])*"


def _pattern(letters: str, statement: bool) -> re.Pattern:
    letter = f"[{re.escape(letters)}]"
    group = f"({letter}(?:{_SEPARATOR}{letter})*)"
    if statement:
        return re.compile(f"{_STATEMENT}{_LINK}{group}(?![A-Za-z0-9]){_AFTER_LETTERS}")
    return re.compile(rf"^[\s(\[【「“\"'*_]*{group}[\s)\]】」”\"'.。*_]*$")


def _plain(text: str) -> str:
    """Full-width letters and punctuation to their plain forms (NFKC), Markdown emphasis removed."""
    return re.sub(r"\*\*|__|`", "", unicodedata.normalize("NFKC", text))


def read_answer(reply: str, letters: str = "ABCDE") -> frozenset[str] | None:
    """The set of option letters `reply` answers, read after its last </think>; None when there is none."""
    if THINK_END not in reply:
        return None
    text = _plain(reply.rsplit(THINK_END, 1)[1])
    letters = _plain(letters).upper()
    statements = list(_pattern(letters, statement=True).finditer(text))
    if statements:
        found = statements[-1].group(1)
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        match = _pattern(letters, statement=False).match(lines[-1]) if lines else None
        if match is None:
            return None
        found = match.group(1)
    return frozenset(ch for ch in found if ch in letters)


def answer_set(answer_letters) -> frozenset[str]:
    """An answer key ("AB", "A、B", ["A", "B"], "Ａ") as a set of plain upper-case letters."""
    text = answer_letters if isinstance(answer_letters, str) else "".join(answer_letters)
    return frozenset(ch for ch in _plain(text).upper() if "A" <= ch <= "Z")


def is_correct(reply: str, answer_letters, letters: str = "ABCDE") -> bool:
    """True when the letters read from `reply` are exactly the answer's (set equality; unparsed is wrong)."""
    read = read_answer(reply, letters)
    return read is not None and read == answer_set(answer_letters)

"""lm-eval hooks of our exam tasks (`!function utils.<name>` in the YAML files beside this one).

The letters a reply chooses are read by medsft.answer_reader, the one reader the project has: after the last
</think>, the last answer statement (答案：C, 故选A、C), letters inside names such as B超 or 维生素B12 skipped.
"""
from medsft.answer_reader import read_answer

UNPARSED = "[invalid]"  # lm-eval's own word for a reply its filter could not read


def read_letters(resps, docs):
    """lm-eval filter: each reply -> its answer letters in order ("C", "ABD"), or "[invalid]" when unreadable.

    A row rendered without thinking (the prompt ends in an empty think block, doc "thinking": false) has no
    </think> in its reply, so the reply is read whole.
    """
    out = []
    for replies, doc in zip(resps, docs):
        letters = "ABCDE"[: len(doc["choices"])]
        read = []
        for reply in replies:
            text = reply if doc.get("thinking", True) else "</think>" + reply
            found = read_answer(text, letters)
            read.append("".join(sorted(found)) if found else UNPARSED)
        out.append(read)
    return out

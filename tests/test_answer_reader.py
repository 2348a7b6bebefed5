"""The answer reader on written replies, as Qwen3 writes them: think, then the answer after </think>."""
import pytest

from medsft.answer_reader import answer_set, is_correct, read_answer

T = "<think>\n先分析题干，再逐项排除。\n</think>\n\n"  # a short think block before each reply below

CASES = [
    # (id, reply, expected letters or None[, the question's option letters when not ABCDE])
    ("plain", T + "答案：C", "C"),
    ("answer-is", T + "根据以上分析，答案是B。", "B"),
    ("answer-wei", T + "本题答案为D", "D"),
    ("zheng-que", T + "正确答案：E。", "E"),
    ("gu-xuan", T + "患者血糖明显升高，故选A。", "A"),
    ("ying-xuan", T + "综合判断，应选C", "C"),
    ("xuan", T + "我选B。", "B"),
    ("xuan-ze", T + "因此选择D，理由如上。", "D"),
    ("b-ultrasound", T + "首选B超检查。答案：A", "A"),
    ("b-ultrasound-only", T + "首选B超检查，必要时行CT。", None),
    ("vitamin-b12", T + "患者为巨幼细胞贫血，需补充维生素B12和叶酸，故选D。答案：D", "D"),
    ("blood-type", T + "A型血与B型血的人群均可发生，答案是C", "C"),
    ("crp", T + "C反应蛋白升高提示感染。所以答案为E。", "E"),
    ("hbv-e-antigen", T + "HBeAg阳性、抗-HBc阳性，提示乙肝活动复制，答案：B", "B"),
    ("by-option", T + "A选项错误，胰岛素不口服。\nB选项错误，剂量过大。\nC选项正确。\n答案：C", "C"),
    ("by-option-after", T + "答案：B\n\n解析：A选项错误；C选项描述的是慢性期；D选项与题干无关。", "B"),
    ("options-listed", T + "选项A是干扰项，选项B才符合典型表现。\n\n最终答案：B", "B"),
    ("changed-mind", T + "一开始我倾向于先选A，但复查后发现A忽略了禁忌证。\n最终答案：C", "C"),
    ("not-a", T + "A有禁忌，不选A。正确答案是D", "D"),
    ("bold", T + "综上所述，**答案：B**", "B"),
    ("bold-letter", T + "答案是 **D**。", "D"),
    ("full-width", T + "答案：Ｃ", "C"),
    ("full-width-punct", T + "故选（Ｂ）。", "B"),
    ("full-width-colon-bold", T + "**正确答案：Ａ**", "A"),
    ("multi-joined", T + "本题为多选题，答案：ABD", "ABD"),
    ("multi-listed", T + "正确答案是A、C、E。", "ACE"),
    ("multi-and", T + "故选A和C", "AC"),
    ("multi-comma", T + "答案：B，D", "BD"),
    ("lone-letter", T + "胰岛素抵抗是主要机制。\n\nB", "B"),
    ("lone-bold-bracket", T + "结论如下：\n**(E)**", "E"),
    ("lone-after-b-ultrasound", T + "B超提示胆囊结石。\nA", "A"),
    ("statement-beats-lone", T + "答案：C\n\nA", "C"),
    ("only-in-think", "<think>\n分析后答案是B。\n</think>\n\n以上是我的思考，请结合临床。", None),
    ("truncated-think", "<think>\n首先考虑A选项，答案是A吗？再看B超结果", None),
    ("no-think-tag", "答案：A", None),
    ("empty-after-think", T, None),
    ("last-think-only", "<think>答案：A</think>答案：B<think>再想想</think>\n答案：C", "C"),
    ("english", T + "The answer is D.", "D"),
    ("answer-colon-option", T + "答案：选项C", "C"),
    ("da-colon", T + "答：E", "E"),
    ("bracket-answer", T + "答案为【A】", "A"),
    ("no-readable", T + "题干信息不足，无法判断。", None),
    ("crp-after-answer", T + "故选C（C反应蛋白是急性时相蛋白）。", "C"),
    ("bold-then-b-ultrasound", T + "答案：**C**。\n\n补充：B超可辅助诊断。", "C"),
    ("negated-only", T + "A有禁忌，不选A。", None),
    ("a-option-only", T + "选项A错误，选项B也不对。", None),
    ("issue-vitamin", T + "…维生素B12…故选D。答案：D", "D"),
    ("issue-by-option", T + "A选项错误…答案：C", "C"),
    ("letter-outside-options", T + "答案：E", None, "ABCD"),  # a four-option question
    ("four-options", T + "答案：D", "D", "ABCD"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_read_answer(case):
    _, reply, expected, *letters = case
    got = read_answer(reply, *letters)
    assert got == (None if expected is None else frozenset(expected))


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_is_correct_is_set_equality():
    reply = T + "故选A、C"
    assert is_correct(reply, "CA") and is_correct(reply, ["A", "C"]) and is_correct(reply, "Ａ、Ｃ")
    assert not is_correct(reply, "A") and not is_correct(reply, "ACD")
    assert not is_correct("<think>答案：A", "A")  # cut off: unparsed is wrong
    assert answer_set("A、B") == frozenset("AB")

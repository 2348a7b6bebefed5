"""Every command the READMEs show names a script that exists, and every --flag it passes is a setting of it."""
import ast
import re

import pytest

from tests.conftest import ROOT

DOCS = {"README.md": 20, "README_zh.md": 20, "bench/README.md": 1}  # each with the fewest commands it shows
# a command: python/torchrun/accelerate launch, up to the script, then its arguments (to the end of the command)
COMMAND = re.compile(r"(?:python3?|torchrun|launch)\b[^`|]*?(?<![\w./-])([\w/]+\.py)((?:[ \t]+[^\s`|]+)*)")
NOT_OURS = {"cpp/convert_hf_to_gguf.py"}  # llama.cpp's converter, run from its own checkout


def settings_of(script: str) -> set[str]:
    """The script's settings: its module-level UPPER_CASE constants, as --lower_case flags."""
    tree = ast.parse((ROOT / script).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names |= {t.id.lower() for t in targets if isinstance(t, ast.Name) and t.id.isupper()}
    return names


def commands(doc: str):
    """(line, script, arguments) of each command in the file, continuation lines (ending in \\) joined."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    n = 0
    while n < len(lines):
        start, line = n + 1, lines[n]
        while line.rstrip().endswith("\\") and n + 1 < len(lines):
            n += 1
            line = line.rstrip()[:-1] + " " + lines[n].strip()
        n += 1
        for match in COMMAND.finditer(line):
            yield start, match.group(1), match.group(2)


@pytest.mark.parametrize("doc", list(DOCS))
def test_every_command_in_the_docs_uses_real_scripts_and_settings(doc, fewest=None):
    problems, seen = [], 0
    for line, script, arguments in commands(doc):
        if script in NOT_OURS:
            continue
        seen += 1
        if not (ROOT / script).is_file():
            problems.append(f"{doc}:{line}: {script} does not exist")
            continue
        known = settings_of(script) | {"help"}
        problems += [f"{doc}:{line}: {script} has no setting --{flag}"
                     for flag in re.findall(r"(?<![\w-])--([a-z_0-9]+)", arguments) if flag not in known]
    assert seen >= (fewest or DOCS[doc]), f"{doc}: only {seen} commands found; the pattern no longer matches the docs"
    assert not problems, "\n".join(problems)


def test_a_wrong_flag_in_a_doc_is_caught(tmp_path, monkeypatch):
    doc = tmp_path / "README.md"
    doc.write_text("```bash\npython train_lora.py --learning_rate=1e-4 \\\n    --learnig_rate=2e-4\n"
                   "python evaluate.py --adapter_path=x\npython nope.py\n```\n" + "python data.py\n" * 3,
                   encoding="utf-8")
    for script in ("train_lora.py", "evaluate.py", "data.py"):
        (tmp_path / script).write_text((ROOT / script).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    with pytest.raises(AssertionError) as e:
        test_every_command_in_the_docs_uses_real_scripts_and_settings("README.md", fewest=5)
    assert "README.md:2: train_lora.py has no setting --learnig_rate" in str(e.value)
    assert "README.md:5: nope.py does not exist" in str(e.value) and "learning_rate " not in str(e.value)

"""v3's dynamic medical-term masking: lexicon terms in the *question* become a placeholder, re-drawn each epoch.

The original v3 rewrote the target text once, in preprocessing. Here the think, the answer and the labels
never change; each time an example is drawn, every lexicon term in its question is masked with
probability MASK_PROB, from a random stream fixed by (SEED, epoch, row), so runs are reproducible.
"""
import random
import re
from pathlib import Path

from medsft.chat_format import build_training_example
from medsft.errors import DataError, UserError
from medsft.no_think import drawn_indices

CATEGORIES = ("疾病", "症状", "药物", "检查", "解剖")  # disease, symptom, drug, examination, anatomy
MASK_STYLES = ("mask", "typed", "progressive")  # "[MASK]"; the term's category such as "[药物]"; [MASK] then typed


def load_lexicon(path) -> dict[str, str]:
    """{term: category} from a UTF-8 TSV with the header `term<TAB>category`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"error: {path}: lexicon not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["term", "category"]:
        raise DataError(path, 1, "the header must be 'term<TAB>category'")
    lexicon = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip():
            raise DataError(path, number, "expected 'term<TAB>category'")
        term, category = parts[0].strip(), parts[1].strip()
        if category not in CATEGORIES:
            raise DataError(path, number, f"unknown category {category!r} (use one of {', '.join(CATEGORIES)})")
        lexicon[term] = category
    return lexicon


class TermMasker:
    def __init__(self, lexicon: dict[str, str]):
        self.lexicon = lexicon
        # longest alternative first: at each position the regex takes the longest term (2型糖尿病 over 糖尿病)
        self.pattern = re.compile("|".join(map(re.escape, sorted(lexicon, key=len, reverse=True))))

    def mask(self, text: str, rng: random.Random, prob: float, style: str = "mask") -> tuple[str, int, int]:
        """(masked text, terms masked, terms found); each found term is masked with probability `prob`."""
        found = masked = 0

        def replace(match):
            nonlocal found, masked
            found += 1
            if rng.random() >= prob:
                return match.group(0)
            masked += 1
            return f"[{self.lexicon[match.group(0)]}]" if style == "typed" else "[MASK]"

        return self.pattern.sub(replace, text), masked, found


def check_masking_settings(cfg) -> list[str]:
    problems = []
    if not 0 <= cfg.MASK_PROB <= 1:
        problems.append(f"mask_prob must be in [0, 1], not {cfg.MASK_PROB}")
    if cfg.MASK_STYLE not in MASK_STYLES:
        problems.append(f"mask_style must be one of {', '.join(MASK_STYLES)}, not {cfg.MASK_STYLE!r}")
    if not Path(cfg.LEXICON_PATH).is_file():
        problems.append(f"lexicon_path {cfg.LEXICON_PATH}: not found")
    return problems


class MaskedQuestionDataset:
    """Training examples whose questions are masked afresh each time they are drawn (a torch map-style dataset)."""

    def __init__(self, rows: list[dict], tokenizer, cfg):
        self.rows, self.tokenizer = rows, tokenizer
        self.masker = TermMasker(load_lexicon(cfg.LEXICON_PATH))
        self.prob, self.style, self.seed = cfg.MASK_PROB, cfg.MASK_STYLE, cfg.SEED
        self.max_length, self.system_prompt = cfg.MAX_LENGTH, cfg.SYSTEM_PROMPT
        self.drop_long = cfg.LONG_EXAMPLES == "drop"
        self.no_think_fraction = cfg.NO_THINK_FRACTION
        self.epoch = 0
        self.reset_counts()

    def reset_counts(self) -> None:
        """Start counting masked terms afresh (the training start calls this, so previews do not count)."""
        self.masked_terms, self.found_terms = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def style_now(self) -> str:
        """"progressive": plain [MASK] in the first epoch (0), the term's category from the second on."""
        if self.style == "progressive":
            return "mask" if self.epoch == 0 else "typed"
        return self.style

    def masked_question(self, index: int) -> tuple[str, int, int]:
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")  # str seeds hash the same in every process
        return self.masker.mask(self.rows[index]["question"], rng, self.prob, self.style_now())

    def drawn_no_think(self, index: int) -> bool:
        """Drawn this epoch (NO_THINK_FRACTION) to be trained as a reply without reasoning, with /no_think."""
        return index in drawn_indices(self.no_think_fraction, len(self), self.seed, self.epoch)

    def is_no_think(self, index: int) -> bool:
        """A reply without reasoning this epoch: drawn, or a row without a think."""
        return self.drawn_no_think(index) or not self.rows[index]["think"]

    def __getitem__(self, index: int) -> dict:
        question, masked, found = self.masked_question(index)
        self.masked_terms += masked
        self.found_terms += found
        row, no_think = self.rows[index], self.drawn_no_think(index)
        example = build_training_example(self.tokenizer, row, self.max_length, self.system_prompt, question=question,
                                         no_think=no_think)
        if example is None or (self.drop_long and example["think_cut"]):
            # masking lengthened the question past MAX_LENGTH: this draw trains the row unmasked (it fits as is)
            example = build_training_example(self.tokenizer, row, self.max_length, self.system_prompt,
                                             no_think=no_think) or build_training_example(
                self.tokenizer, row, self.max_length, self.system_prompt)
        return example

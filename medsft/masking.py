"""v3's dynamic medical-term masking: lexicon terms in the *question* become a placeholder, re-drawn each epoch.

The original v3 rewrote the target text once, in preprocessing. Here the think, the answer and the labels
never change; each time an example is drawn, every lexicon term in its question is masked with
probability MASK_PROB, from a random stream fixed by (SEED, epoch, row), so runs are reproducible.

MASK_POLICY "seed" (the originals') may mask a term that the reply then restates word for word: the model learns
to name, in its think and answer, a disease or drug the user never said. "absent_from_reply" keeps such a term
in the question and masks only terms the reply does not restate: the model learns to answer a question with a
gap without filling it in. Both draw the same random number for each term, so "absent_from_reply" masks a subset
of what "seed" masks.
"""
import os
import random
import re
from pathlib import Path

from medsft.chat_format import (END_OF_TURN, IGNORE_INDEX, _added_token_pattern, _render_prompt,
                                build_conversation_example, build_row_example, build_training_example,
                                with_no_think_switch)
from medsft.distributed import is_main_process
from medsft.errors import DataError, UserError
from medsft.no_think import drawn_indices, has_empty_think, without_reasoning
from medsft.tokenized_examples import encode_pieces

CATEGORIES = ("疾病", "症状", "药物", "检查", "解剖")  # disease, symptom, drug, examination, anatomy
MASK_STYLES = ("mask", "typed", "progressive")  # "[MASK]"; the term's category such as "[药物]"; [MASK] then typed
MASK_POLICIES = ("seed", "absent_from_reply")  # mask any drawn term; mask only drawn terms the reply does not restate


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

    def draws(self, text: str, rng: random.Random, prob: float, keep: str = ""):
        """(match, masked?) for each lexicon term in `text`, in order: one draw per term, masked with probability
        `prob`, except that a term occurring in `keep` (the reply, under "absent_from_reply") is never masked."""
        for match in self.pattern.finditer(text):
            drawn = rng.random() < prob
            yield match, drawn and match.group(0) not in keep

    def mask(self, text: str, rng: random.Random, prob: float, style: str = "mask",
             keep: str = "") -> tuple[str, int, int]:
        """(masked text, terms masked, terms found); each found term is masked with probability `prob`."""
        parts, end, found, masked = [], 0, 0, 0
        for match, masked_now in self.draws(text, rng, prob, keep):
            found += 1
            if masked_now:
                masked += 1
                placeholder = f"[{self.lexicon[match.group(0)]}]" if style == "typed" else "[MASK]"
                parts += [text[end:match.start()], placeholder]
                end = match.end()
        return "".join(parts) + text[end:], masked, found


def check_masking_settings(cfg) -> list[str]:
    problems = []
    if not 0 <= cfg.MASK_PROB <= 1:
        problems.append(f"mask_prob must be in [0, 1], not {cfg.MASK_PROB}")
    if cfg.MASK_STYLE not in MASK_STYLES:
        problems.append(f"mask_style must be one of {', '.join(MASK_STYLES)}, not {cfg.MASK_STYLE!r}")
    if cfg.MASK_POLICY not in MASK_POLICIES:
        problems.append(f"mask_policy must be one of {', '.join(MASK_POLICIES)}, not {cfg.MASK_POLICY!r}")
    if not Path(cfg.LEXICON_PATH).is_file():
        problems.append(f"lexicon_path {cfg.LEXICON_PATH}: not found")
    return problems


class MaskedQuestionDataset:
    """Training examples whose questions are masked afresh each time they are drawn (a torch map-style dataset)."""

    def __init__(self, rows: list[dict], tokenizer, cfg, examples=None):
        """`examples`: each row's unmasked example as tokenized once (load_training_data's train_examples);
        a draw then re-tokenizes only the question's turn. Without them they are tokenized here."""
        self.rows, self.tokenizer = rows, tokenizer
        self.masker = TermMasker(load_lexicon(cfg.LEXICON_PATH))
        self.prob, self.style, self.seed, self.policy = cfg.MASK_PROB, cfg.MASK_STYLE, cfg.SEED, cfg.MASK_POLICY
        self.max_length, self.system_prompt = cfg.MAX_LENGTH, cfg.SYSTEM_PROMPT
        self.drop_long = cfg.LONG_EXAMPLES == "drop"
        self.no_think_fraction = cfg.NO_THINK_FRACTION
        self.epoch = 0
        self.reset_counts()
        if examples is None:
            from medsft.tokenized_examples import tokenize_examples

            examples, kept, _ = tokenize_examples(tokenizer, rows, self.max_length, self.system_prompt)
            if len(kept) != len(rows):
                raise ValueError("MaskedQuestionDataset: every row must fit max_length")
        self.examples = examples
        self._start, self._end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", END_OF_TURN))
        # the question's turn is "<|im_start|>user\n{question}<|im_end|>": its ids are the tokenizer's for
        # "user\n{question}" alone (the tokenizer splits at added tokens), so a draw replaces just those
        probe = _render_prompt(tokenizer, "\ue002", "\ue003", ()).text
        self._splice = "<|im_start|>user\n\ue002<|im_end|>" in probe

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

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}-{self.epoch}-{index}")  # str seeds hash the same in every process

    def kept_terms_text(self, index: int) -> str:
        """Text whose terms are never masked: the reply under "absent_from_reply", else nothing."""
        return reply_text(self.rows[index]) if self.policy == "absent_from_reply" else ""

    def masked_question(self, index: int) -> tuple[str, int, int]:
        return self.masker.mask(self.rows[index]["question"], self.rng(index), self.prob, self.style_now(),
                                self.kept_terms_text(index))

    def restated_terms(self) -> dict:
        """Over every training row, with this epoch's draws: lexicon terms in the questions, those masked, and
        how many of each the reply (think and answer) restates word for word."""
        counts = dict.fromkeys(("found", "found_restated", "masked", "masked_restated"), 0)
        for index, row in enumerate(self.rows):
            reply = reply_text(row)
            for match, masked in self.masker.draws(row["question"], self.rng(index), self.prob,
                                                   self.kept_terms_text(index)):
                restated = match.group(0) in reply
                counts["found"] += 1
                counts["found_restated"] += restated
                counts["masked"] += masked
                counts["masked_restated"] += masked and restated
        return counts

    def every_variant(self):
        """Each row's example unmasked and with every term masked, in each placeholder style the run uses:
        the tokens a draw can feed the model (EMBEDDING_MODE="tokens" trains their embedding rows)."""
        styles = ("mask", "typed") if self.style == "progressive" else (self.style,)
        for row in self.rows:
            for style in (None, *styles):
                mask = None if style is None else (
                    lambda text, style=style: self.masker.mask(text, random.Random(0), 1.0, style)[0])
                if "messages" in row:
                    example = build_conversation_example(self.tokenizer, row["messages"], self.max_length,
                                                         self.system_prompt, mask_user=mask)
                else:
                    question = row["question"] if mask is None else mask(row["question"])
                    example = build_training_example(self.tokenizer, row, self.max_length, self.system_prompt,
                                                     question=question)
                if example is not None:
                    yield example
        if self.no_think_fraction > 0 and self.rows:  # a reply without reasoning adds the tokens of " /no_think"
            yield from filter(None, [build_row_example(self.tokenizer, without_reasoning(self.rows[0]),
                                                       self.max_length, self.system_prompt)])

    def _question_turn(self, ids: list[int]) -> tuple[int, int]:
        """(first, end) of the question turn's ids "user\n{question}" in a single-turn example's ids."""
        first = ids.index(self._start, 1) + 1
        return first, ids.index(self._end, first)

    def _fits_spliced(self, index: int, question: str) -> bool:
        row = self.rows[index]
        return (self._splice and "messages" not in row and not self.examples.meta["think_cut"][index]
                and not _has_added_token(self.tokenizer, question) and not _has_added_token(self.tokenizer, row["question"]))

    def _spliced(self, index: int, question: str, turn_ids: list[int] | None = None) -> dict | None:
        """The row's example with its question replaced, from the example tokenized once: exactly what
        build_training_example gives when the example fits without cutting its think; else None."""
        if not self._fits_spliced(index, question):
            return None
        example = self.examples[index]
        if question == self.rows[index]["question"]:
            return example
        if turn_ids is None:
            turn_ids = encode_pieces(self.tokenizer, ["user\n" + question])[0]
        ids = example["input_ids"]
        first, end = self._question_turn(ids)
        grown = len(turn_ids) - (end - first)
        if len(ids) + grown > self.max_length:
            return None
        ids = ids[:first] + turn_ids + ids[end:]
        labels = [IGNORE_INDEX] * (end + grown) + example["labels"][end:]
        return {**example, "input_ids": ids, "labels": labels, "think_end": example["think_end"] + grown}

    def lengths(self) -> list[int]:
        """Each example's token count as this epoch draws it, with one batch call for the masked questions."""
        lengths = self.examples.lengths().tolist()
        pending = {}
        for index, row in enumerate(self.rows):
            if "messages" in row or self.drawn_no_think(index) or not self._fits_spliced(index, row["question"]):
                pending[index] = None
                continue
            question = self.masked_question(index)[0]
            if question != row["question"]:
                pending[index] = question
        todo = [i for i, q in pending.items() if q is not None and not _has_added_token(self.tokenizer, q)]
        for index, turn in zip(todo, encode_pieces(self.tokenizer, ["user\n" + pending[i] for i in todo])):
            first, end = self._question_turn(self.examples.prompt_ids(index))
            if lengths[index] + len(turn) - (end - first) <= self.max_length:
                lengths[index] += len(turn) - (end - first)
                del pending[index]
        for index in pending:  # conversations, draws without reasoning, cut thinks: built as training builds them
            lengths[index] = len(self[index]["input_ids"])
        return lengths

    def variant_token_ids(self) -> set[int]:
        """The token ids of every_variant's examples, from the examples tokenized once and one batch call for the
        fully masked questions' turns; kept beside the examples' cache when they came from one."""
        import numpy as np

        cached = getattr(self.examples, "cache_path", None)
        sidecar = cached.with_suffix(".tokens.npy") if cached is not None else None
        if sidecar is not None and sidecar.is_file():
            return set(np.load(sidecar).tolist())
        tokens = self._variant_token_ids()
        if sidecar is not None and is_main_process():
            staging = sidecar.with_name(f".{sidecar.stem}.{os.getpid()}.npy")
            np.save(staging, np.asarray(sorted(tokens), dtype=np.int32))
            os.replace(staging, sidecar)
        return tokens

    def _variant_token_ids(self) -> set[int]:
        tokens = self.examples.token_set()
        styles = ("mask", "typed") if self.style == "progressive" else (self.style,)
        turns, rebuild = [], []
        for index, row in enumerate(self.rows):
            if "messages" in row:
                rebuild.append(index)
                continue
            if not self.masker.pattern.search(row["question"]):
                continue  # masking changes nothing: the unmasked example already counts
            for style in styles:
                question = self.masker.mask(row["question"], random.Random(0), 1.0, style)[0]
                if self._fits_spliced(index, question):
                    turns.append((index, question))
                else:
                    rebuild.append((index, style))
        for (index, question), turn in zip(turns, encode_pieces(self.tokenizer, ["user\n" + q for _, q in turns])):
            first, end = self._question_turn(self.examples.prompt_ids(index))
            if self.examples.length(index) + len(turn) - (end - first) <= self.max_length:
                tokens.update(turn)
            else:
                tokens.update(_ids(build_training_example(self.tokenizer, self.rows[index], self.max_length,
                                                          self.system_prompt, question=question)))
        for item in rebuild:
            if isinstance(item, int):  # a conversation: every style as every_variant builds it
                for example in self._conversation_variants(self.rows[item], styles):
                    tokens.update(example["input_ids"])
            else:
                index, style = item
                question = self.masker.mask(self.rows[index]["question"], random.Random(0), 1.0, style)[0]
                tokens.update(_ids(build_training_example(self.tokenizer, self.rows[index], self.max_length,
                                                          self.system_prompt, question=question)))
        if self.no_think_fraction > 0 and self.rows:
            tokens.update(_ids(build_row_example(self.tokenizer, without_reasoning(self.rows[0]), self.max_length,
                                                 self.system_prompt)))
        return tokens

    def _conversation_variants(self, row: dict, styles):
        for style in (None, *styles):
            mask = None if style is None else (
                lambda text, style=style: self.masker.mask(text, random.Random(0), 1.0, style)[0])
            example = build_conversation_example(self.tokenizer, row["messages"], self.max_length,
                                                 self.system_prompt, mask_user=mask)
            if example is not None:
                yield example

    def masked_user_turn(self, rng: random.Random):
        """A conversation's masker: each user turn in order, from the row's one random stream."""
        def mask(text: str) -> str:
            text, masked, found = self.masker.mask(text, rng, self.prob, self.style_now())
            self.masked_terms += masked
            self.found_terms += found
            return text
        return mask

    def drawn_no_think(self, index: int) -> bool:
        """Drawn this epoch (NO_THINK_FRACTION) to be trained as a reply without reasoning, with /no_think."""
        return index in drawn_indices(self.no_think_fraction, len(self), self.seed, self.epoch)

    def is_no_think(self, index: int) -> bool:
        """A reply without reasoning this epoch: drawn, or a row without a think."""
        return self.drawn_no_think(index) or has_empty_think(self.rows[index])

    def __getitem__(self, index: int) -> dict:
        row = without_reasoning(self.rows[index]) if self.drawn_no_think(index) else self.rows[index]
        if "messages" in row:  # a conversation up to the trained reply: only its user turns are masked
            rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
            example = build_conversation_example(self.tokenizer, row["messages"], self.max_length, self.system_prompt,
                                                 mask_user=self.masked_user_turn(rng))
            if example is None or (self.drop_long and example["think_cut"]):
                example = build_conversation_example(self.tokenizer, row["messages"], self.max_length,
                                                     self.system_prompt)
            return example
        question, masked, found = self.masked_question(index)
        self.masked_terms += masked
        self.found_terms += found
        if row is not self.rows[index]:  # drawn without reasoning: the masked question gets its /no_think too
            question = with_no_think_switch(question)
        example = self._spliced(index, question) if row is self.rows[index] else None
        if example is not None:
            return example
        example = build_training_example(self.tokenizer, row, self.max_length, self.system_prompt, question=question)
        if example is None or (self.drop_long and example["think_cut"]):
            # masking lengthened the question past MAX_LENGTH: this draw trains the row unmasked (it fits as is)
            example = build_training_example(self.tokenizer, row, self.max_length, self.system_prompt) \
                or build_training_example(self.tokenizer, self.rows[index], self.max_length, self.system_prompt)
        return example


def _has_added_token(tokenizer, text: str) -> bool:
    return "<" in text and _added_token_pattern(tokenizer).search(text) is not None


def _ids(example: dict | None) -> list[int]:
    return example["input_ids"] if example is not None else []


def reply_text(row: dict) -> str:
    return f"{row['think']}\n{row['answer']}"


def print_restated_terms(dataset: MaskedQuestionDataset) -> dict:
    """One line for the dry run: how many masked question terms the trained reply restates word for word."""
    c = dataset.restated_terms()
    share = f" ({100 * c['masked_restated'] / c['masked']:.0f}%)" if c["masked"] else ""
    print(f"masking (mask_policy {dataset.policy!r}, the first epoch's draw): {c['masked']} of {c['found']} question "
          f"terms masked; {c['masked_restated']} of the masked{share} appear word for word in the trained reply "
          f"(each teaches the model to name a term the user never said); {c['found_restated']} of all {c['found']} "
          "question terms are restated", flush=True)
    return c

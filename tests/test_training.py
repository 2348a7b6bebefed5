"""train_lora.py, train_lora2.py, train_lora3.py on the tiny Qwen3: outputs, reload, resume, masking, learning."""
import json
import random
import re
import sys

import pytest
import torch

import train_lora
import train_lora2
import train_lora3
from medsft.errors import UserError
from tests.conftest import FAST_TRAINING, SHORT_QUESTIONS, two_step_run

SCRIPTS = {"v1": train_lora, "v2": train_lora2, "v3": train_lora3}


def run(script, tiny_model_dir, data_dir, out, *extra):
    return script.main([f"--model_path={tiny_model_dir}", f"--data_dir={data_dir}", f"--output_dir={out}",
                        *FAST_TRAINING, *extra])


def load_adapter(base_dir, adapter_dir):
    from peft import PeftModel

    from medsft.model_loading import load_base_model

    return PeftModel.from_pretrained(load_base_model(str(base_dir), load_in_4bit=True), str(adapter_dir)).eval()


@pytest.mark.parametrize("version", SCRIPTS)
def test_each_version_runs_end_to_end(version, train_once, tiny_model_dir, sample_data_dir):
    out, result, printed = train_once(version, sample_data_dir)
    for name in ("final/adapter_model.safetensors", "final/adapter_config.json", "final/settings.json",
                 "final/tokenizer.json", "summary.json", "metrics.jsonl", "loss.png", "settings.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["version"] == version and summary["steps"] == 3
    assert summary["best_step"] in (2, 3) and summary["train_tokens"] > 0
    for key in ("final_train_loss", "best_val_loss", "wall_time_s", "train_tokens_per_s"):
        assert summary[key] is not None and summary[key] == summary[key] and summary[key] < float("inf")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 3]
    assert json.loads((out / "final" / "settings.json").read_text())["VERSION"] == version
    assert result["summary"] == summary
    assert load_adapter(tiny_model_dir, out / "final") is not None
    assert "sample answer to a val question" in printed
    trained = re.search(r"trainable parameters: .*", printed)[0]
    assert "model.embed_tokens" not in trained, trained  # a module is named once


def test_v2_full_trains_the_tied_embedding_once_and_reloads_with_the_same_logits(train_once, tiny_model_dir,
                                                                                short_data_dir):
    tmp_path, result, printed = train_once("v2", short_data_dir, "--learning_rate=1e-2", "--embedding_mode=full")
    # (also test_merge.py's v2 adapter); the one tied matrix is named once, not as two embeddings
    assert "fully trained: embed_tokens (tied to lm_head: one matrix)" in printed and "model.embed_tokens" not in printed
    model = result["trainer"].model
    inner = model.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight  # still tied
    embedding = inner.model.embed_tokens.modules_to_save["default"].weight
    assert embedding.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result["summary"]["trainable_params"] == trainable
    assert trainable == embedding.numel() + sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.model.embed_tokens.weight"], embedding.detach().cpu())
    ids = torch.tensor([[151644, 8948, 198, 100, 200, 300, 151645]])
    reloaded_model = load_adapter(tiny_model_dir, tmp_path / "final")
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits.float()
        reloaded = reloaded_model(input_ids=ids).logits.float()
    # training keeps fp32 copies, the reloaded bf16 base computes in bf16: equal up to bf16 rounding
    torch.testing.assert_close(reloaded, expected, rtol=2e-2, atol=2e-2)
    original = reloaded_model.get_base_model().model.embed_tokens.original_module.weight
    assert not torch.allclose(original.float(), embedding.detach().float())  # the embedding really was trained


def test_dry_run_prints_the_first_row_as_the_chat_template_renders_it(tiny_model_dir, sample_data_dir, tmp_path, capsys):
    from medsft.chat_format import SYSTEM_PROMPT, build_messages, format_reply
    from medsft.records import read_jsonl

    result = run(train_lora, tiny_model_dir, sample_data_dir, tmp_path, "--dry_run=True", "--max_length=2048")
    out = capsys.readouterr().out
    assert "trainable parameters" not in out and not (tmp_path / "final").exists()
    first = read_jsonl(sample_data_dir / "train.jsonl")[0][1]
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    rendered = tokenizer.apply_chat_template(
        build_messages(first["question"], SYSTEM_PROMPT, reply=format_reply(first["think"], first["answer"])),
        tokenize=False)
    shown = out.split("==== first training example, exactly as trained (between the rulers) ====\n")[1]
    assert shown.split("\n==== its trained part")[0] == rendered
    trained = out.split("==== its trained part (labels != -100) ====\n")[1].split("\n==== end ====")[0]
    assert trained == rendered.split("<|im_start|>assistant\n")[1].removesuffix("\n")
    assert "p50" in out and "p99" in out and result["data"].stats["train_examples"] == 45


def test_the_sample_answer_samples_as_qwen3_thinking_mode_asks_with_the_runs_seed(trained_adapter, tiny_model_dir,
                                                                                 capsys):
    from medsft.assistant import load_model
    from medsft.chat_format import SYSTEM_PROMPT
    from medsft.generation import generate_replies
    from medsft.training import print_sample_answer

    model, tokenizer = load_model(str(tiny_model_dir), trained_adapter)
    question = "头痛怎么办？"

    def sample_answer(seed):
        class Settings:
            SAMPLE_MAX_NEW_TOKENS, SEED = 12, seed
        Settings.SYSTEM_PROMPT = SYSTEM_PROMPT
        return print_sample_answer(model, tokenizer, question, Settings)

    first, again, other_seed = sample_answer(42), sample_answer(42), sample_answer(7)
    assert capsys.readouterr().out.count("sample answer to a val question") == 3

    def reply(**options):
        return generate_replies(model, tokenizer, [question], max_new_tokens=12, **options)[0].text

    assert first == again == reply(temperature=0.6, top_p=0.95, top_k=20, seed=42)  # Qwen3's thinking-mode sampling
    assert first != other_seed  # the seed decides it
    assert first != reply(temperature=0.0)  # not greedy


def test_settings_problems_are_reported_together_before_loading(tmp_path):
    with pytest.raises(UserError) as e:
        train_lora.main([f"--data_dir={tmp_path / 'none'}", "--learning_rate=0", "--lr_scheduler=wavy",
                         "--batch_size=0", "--model_path=/does/not/matter"])
    message = str(e.value)
    for part in ("train.jsonl: not found", "learning_rate", "lr_scheduler", "batch_size"):
        assert part in message


def test_resume_continues_from_the_newest_checkpoint(train_once, tiny_model_dir, short_data_dir, tmp_path, capsys):
    two_step_run(train_once, short_data_dir, tmp_path)
    assert (tmp_path / "checkpoint-2").is_dir()
    summary = run(train_lora, tiny_model_dir, short_data_dir, tmp_path, "--max_steps=4", "--save_steps=1")["summary"]
    assert f"resuming from {tmp_path / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    assert summary["steps"] == 4 and (tmp_path / "checkpoint-4").is_dir()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no records duplicated by the resume


def test_a_resumed_run_reports_the_whole_run_and_the_last_window_loss(tiny_model_dir, short_data_dir, tmp_path):
    constant = ["--lr_scheduler=constant", "--save_steps=1", "--lora_dropout=0", "--log_steps=3"]
    run(train_lora, tiny_model_dir, short_data_dir, tmp_path / "a", *constant, "--max_steps=2")
    half = json.loads((tmp_path / "a" / "summary.json").read_text())
    resumed = run(train_lora, tiny_model_dir, short_data_dir, tmp_path / "a", *constant, "--max_steps=4")["summary"]
    straight = run(train_lora, tiny_model_dir, short_data_dir, tmp_path / "b", *constant, "--max_steps=4")["summary"]
    assert resumed["train_tokens"] == straight["train_tokens"] > half["train_tokens"] > 0  # carried in the checkpoint
    assert resumed["wall_time_s"] > half["wall_time_s"]
    losses = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert sorted(losses) == [1, 3, 4]  # the first step, every LOG_STEPS, and the last (shorter) window
    assert straight["final_train_loss"] == losses[4] and resumed["final_train_loss"] == pytest.approx(losses[4])


def test_resume_skips_a_checkpoint_left_half_written(tmp_path):
    from medsft.resume import last_complete_checkpoint

    for step in (2, 4, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")  # not 10: killed while saving

    from medsft.resume import remove_incomplete_checkpoints  # what Ctrl-C does before naming the newest checkpoint

    remove_incomplete_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_resume_drops_metrics_after_the_checkpoint_and_a_torn_line(tmp_path):
    from medsft.trainer import LoggingCallback

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.9}\n{"step": 3, "loss": 1.8}\n{"step": 4, "lo')
    LoggingCallback(path).truncate_after(2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.9}\n'


def test_a_finished_run_says_so_first_exits_0_and_is_not_overwritten(train_once, tiny_model_dir, short_data_dir,
                                                                        tmp_path, capsys):
    import shutil

    shutil.copytree(train_once("v1", short_data_dir, "--learning_rate=1e-2")[0], tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "final" / "adapter_model.safetensors").read_bytes()
    assert run(train_lora, tiny_model_dir, short_data_dir, tmp_path, "--learning_rate=1e-2", "--eval_steps=1") is None
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{tmp_path} holds this run, finished (3 steps, best val loss ")
    assert f"the result is in {tmp_path / 'final'}/" in out and "--overwrite=True" in out
    assert len(out.splitlines()) == 1  # before the settings, the token statistics and the first example
    with pytest.raises(UserError, match="nothing to resume"):  # another run in the same folder
        run(train_lora, tiny_model_dir, short_data_dir, tmp_path, "--learning_rate=1e-2", "--lora_r=4")
    assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() == before
    run(train_lora, tiny_model_dir, short_data_dir, tmp_path, "--learning_rate=1e-2", "--overwrite=True", "--seed=3")
    assert (tmp_path / "final" / "adapter_model.safetensors").read_bytes() != before


def test_planned_steps_count_every_process(monkeypatch):
    from types import SimpleNamespace

    from medsft.resume import planned_steps

    cfg = SimpleNamespace(MAX_STEPS=-1, EPOCHS=2, BATCH_SIZE=5, GRADIENT_ACCUMULATION=1)
    assert planned_steps(cfg, 10) == 4
    monkeypatch.setenv("WORLD_SIZE", "2")  # each process takes every other batch: one step per epoch
    assert planned_steps(cfg, 10) == 2
    assert planned_steps(SimpleNamespace(**(vars(cfg) | {"MAX_STEPS": 7})), 10) == 7


def test_a_few_rows_lose_most_of_their_training_loss(tiny_model_dir, tmp_path):
    import data

    rows = [{"question": q, "think": f"用户问{q[:2]}。", "answer": f"{q[:2]}请及时就医。"} for q in SHORT_QUESTIONS[:10]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    data.main([f"--source={tmp_path / 'rows.jsonl'}", f"--data_dir={tmp_path / 'd'}", "--val_fraction=0.2"])
    # 20 steps: the loss falls by ~0.55 a step from ~12, under a quarter of it from step 18 (1.9 at step 20)
    run(train_lora2, tiny_model_dir, tmp_path / "d", tmp_path / "o", "--max_steps=20", "--batch_size=8",
        "--gradient_accumulation=1", "--learning_rate=1e-2", "--lr_scheduler=constant", "--warmup_ratio=0",
        "--lora_dropout=0", "--log_steps=1", "--eval_steps=20", "--save_steps=20")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses[0] > 11 and losses[-1] < 0.25 * losses[0]


# ---- v3's masking -------------------------------------------------------------------------------------


class MaskingSettings:
    LEXICON_PATH, MASK_PROB, MASK_STYLE, SEED, MAX_LENGTH = "data/medical_terms.tsv", 0.15, "mask", 42, 2048
    LONG_EXAMPLES, MASK_POLICY, NO_THINK_FRACTION = "shorten_think", "seed", 0.0
    from medsft.chat_format import SYSTEM_PROMPT


def masked_dataset(tokenizer, rows, **overrides):
    from medsft.masking import MaskedQuestionDataset

    cfg = MaskingSettings()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return MaskedQuestionDataset(rows, tokenizer, cfg)


@pytest.fixture(scope="module")
def sample_rows():
    from medsft.records import read_jsonl

    return [row for _, row in read_jsonl("data/sample.jsonl")]


def test_mask_prob_1_masks_every_term_and_leaves_the_labels(tokenizer, sample_rows):
    from medsft.chat_format import IGNORE_INDEX, build_training_example
    from medsft.masking import TermMasker, load_lexicon

    dataset = masked_dataset(tokenizer, sample_rows, MASK_PROB=1.0)
    lexicon = load_lexicon("data/medical_terms.tsv")
    for index, row in enumerate(sample_rows):
        question, masked, found = dataset.masked_question(index)
        assert masked == found
        assert TermMasker(lexicon).pattern.search(question.replace("[MASK]", "\0")) is None
        example, plain = dataset[index], build_training_example(tokenizer, row, 2048)
        trained = [label for label in example["labels"] if label != IGNORE_INDEX]
        assert trained == [label for label in plain["labels"] if label != IGNORE_INDEX]
    assert dataset.masked_terms > 100


def test_longest_term_first_and_typed_style():
    from medsft.masking import TermMasker

    masker = TermMasker({"糖尿病": "疾病", "2型糖尿病": "疾病", "二甲双胍": "药物", "胃": "解剖"})
    text, masked, found = masker.mask("2型糖尿病吃二甲双胍伤胃吗", random.Random(0), 1.0, "typed")
    assert text == "[疾病]吃[药物]伤[解剖]吗" and masked == found == 3
    assert masker.mask("糖尿病", random.Random(0), 0.0)[0] == "糖尿病"


def test_mask_rate_is_near_mask_prob(tokenizer, sample_rows):
    dataset = masked_dataset(tokenizer, sample_rows)
    masked = found = 0
    for epoch in range(20):
        dataset.set_epoch(epoch)
        for index in range(len(sample_rows)):
            _, m, f = dataset.masked_question(index)
            masked, found = masked + m, found + f
    assert found > 2000 and abs(masked / found - 0.15) < 0.02


def test_masks_differ_between_epochs_and_repeat_for_the_same_seed(tokenizer, sample_rows):
    def questions(seed, epoch):
        dataset = masked_dataset(tokenizer, sample_rows, SEED=seed, MASK_PROB=0.5)
        dataset.set_epoch(epoch)
        return [dataset.masked_question(i)[0] for i in range(len(sample_rows))]

    assert questions(42, 0) == questions(42, 0)
    assert questions(42, 0) != questions(42, 1)
    assert questions(42, 0) != questions(7, 0)


def test_progressive_masks_with_mask_in_the_first_epoch_and_the_category_from_the_second(tokenizer, sample_rows):
    from types import SimpleNamespace

    from medsft.masking import CATEGORIES
    from medsft.trainer import SetEpochCallback

    dataset = masked_dataset(tokenizer, sample_rows, MASK_STYLE="progressive", MASK_PROB=1.0)
    callback = SetEpochCallback(dataset)
    placeholders = "|".join(["MASK", *CATEGORIES])

    def placeholders_at(epoch):  # the trainer's state.epoch at the start of an epoch, as the callback reads it
        callback.on_epoch_begin(None, SimpleNamespace(epoch=float(epoch)), None)
        questions = [dataset.masked_question(i)[0] for i in range(len(sample_rows))]
        return {p for q in questions for p in re.findall(rf"\[({placeholders})\]", q)}

    assert placeholders_at(0) == {"MASK"}
    assert placeholders_at(1) <= set(CATEGORIES) and len(placeholders_at(1)) >= 3
    assert placeholders_at(2) <= set(CATEGORIES)
    assert placeholders_at(0) == {"MASK"}  # set by the epoch, not by how many epochs have passed


def test_mask_policy_absent_from_reply_masks_only_the_terms_the_reply_does_not_restate(tokenizer, sample_rows):
    from medsft.masking import TermMasker, load_lexicon, reply_text

    pattern = TermMasker(load_lexicon("data/medical_terms.tsv")).pattern
    seed = masked_dataset(tokenizer, sample_rows, MASK_PROB=1.0)
    absent = masked_dataset(tokenizer, sample_rows, MASK_PROB=1.0, MASK_POLICY="absent_from_reply")
    restated_somewhere = False
    for index, row in enumerate(sample_rows):
        terms, reply = pattern.findall(row["question"]), reply_text(row)
        question, masked, found = absent.masked_question(index)
        left = pattern.findall(question.replace("[MASK]", "\0"))
        assert sorted(left) == sorted(t for t in terms if t in reply)  # kept: exactly the restated terms
        assert masked == sum(t not in reply for t in terms) and found == len(terms)
        restated_somewhere |= bool(left)
        assert seed.masked_question(index)[1] == len(terms)  # "seed" masks them all, restated or not
    assert restated_somewhere

    # at a real mask_prob the same draws are made: "absent_from_reply" masks "seed"'s masks less the restated ones
    counts = {policy: masked_dataset(tokenizer, sample_rows, MASK_PROB=0.5, MASK_POLICY=policy).restated_terms()
              for policy in ("seed", "absent_from_reply")}
    assert counts["seed"]["masked_restated"] > 10 and counts["absent_from_reply"]["masked_restated"] == 0
    assert counts["absent_from_reply"]["masked"] == counts["seed"]["masked"] - counts["seed"]["masked_restated"]
    assert counts["seed"]["found"] == counts["absent_from_reply"]["found"] > counts["seed"]["masked"]


def test_the_v3_dry_run_prints_how_many_masked_terms_the_reply_restates(tiny_model_dir, sample_data_dir, tmp_path,
                                                                          capsys):
    from medsft.masking import print_restated_terms

    result = run(train_lora3, tiny_model_dir, sample_data_dir, tmp_path, "--dry_run=True",
                 "--mask_policy=absent_from_reply")
    dataset = result["data"].train_set
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("masking (")]
    assert len(lines) == 1 and " 0 of the masked (0%) appear word for word in the trained reply" in lines[0]
    dataset.policy = "seed"  # the default: the same draws, restated terms masked too
    counts = print_restated_terms(dataset)
    assert capsys.readouterr().out.startswith(
        f"masking (mask_policy 'seed', the first epoch's draw): {counts['masked']} of {counts['found']} question "
        f"terms masked; {counts['masked_restated']} of the masked (")
    assert counts["masked_restated"] > 0 and counts["masked"] > counts["masked_restated"]


def test_an_unknown_mask_policy_is_refused(tiny_model_dir, sample_data_dir, tmp_path):
    with pytest.raises(UserError, match="mask_policy must be one of seed, absent_from_reply, not 'never'"):
        run(train_lora3, tiny_model_dir, sample_data_dir, tmp_path, "--dry_run=True", "--mask_policy=never")


def test_v3_redraws_masks_every_epoch_during_training(tiny_model_dir, short_data_dir, tmp_path):
    result = run(train_lora3, tiny_model_dir, short_data_dir, tmp_path, "--max_steps=-1", "--epochs=2",
                 "--mask_prob=1.0", "--batch_size=5", "--gradient_accumulation=1", "--eval_steps=100",
                 "--save_steps=100", "--log_steps=1")
    dataset = result["trainer"].train_dataset
    assert dataset.epoch == 1 and dataset.masked_terms > 0 and dataset.masked_terms == dataset.found_terms
    logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("masked_terms", 0) > 0 for r in logged)


# ---- speed options leave the loss unchanged ------------------------------------------------------------


def test_packing_equals_padding_and_our_eval_loss_equals_transformers_loss(tiny_model_dir, sample_data_dir):
    """The Trainer's loss (the forward with labels and num_items_in_batch) is the same packed or padded, and
    evaluation's per-token losses (the forward with logits_to_keep) average to it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft.batching import collate
    from medsft.chat_format import IGNORE_INDEX, build_training_example
    from medsft.losses import MODEL_INPUTS, token_losses
    from medsft.records import read_jsonl

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [row for _, row in read_jsonl(sample_data_dir / "train.jsonl")][:4]
    examples = [build_training_example(tokenizer, row, 2048) for row in rows]
    results = {}
    for packing in (False, True):
        batch = collate(examples, tokenizer.pad_token_id, packing)
        trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        model.zero_grad()
        loss = model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, labels=batch["labels"], use_cache=False,
                     num_items_in_batch=torch.tensor(trained)).loss  # what QLoRATrainer.compute_loss calls
        loss.backward()
        with torch.no_grad():
            losses, segments = token_losses(model, batch)
        assert losses.numel() == segments.numel() == trained
        torch.testing.assert_close(losses.mean(), loss.detach(), rtol=1e-5, atol=1e-5)
        results[packing] = (loss.detach(), losses, model.model.layers[0].mlp.up_proj.weight.grad.clone())
    for padded, packed in zip(results[False], results[True]):
        torch.testing.assert_close(packed, padded, rtol=1e-4, atol=1e-5)


def test_out_of_memory_names_the_settings_to_lower(tmp_path):
    from types import SimpleNamespace

    from medsft.training import train

    class Exploding:
        best_dir, best, callback_handler = tmp_path / "best", None, SimpleNamespace(callbacks=[])

        def train(self, resume_from_checkpoint=None):
            raise torch.OutOfMemoryError("CUDA out of memory")

    cfg = SimpleNamespace(BATCH_SIZE=4, MAX_LENGTH=2048, OUTPUT_DIR=str(tmp_path), save=lambda d: None)
    with pytest.raises(UserError) as e:
        train(Exploding(), None, cfg)
    assert "--batch_size" in str(e.value) and "--max_length" in str(e.value)


def test_trainable_parameters_of_qwen3_1_7b_v1_and_v2():
    """The real Qwen3-1.7B shape on the meta device (no weights): what v1 and v2 train, as quoted in the README."""
    from types import SimpleNamespace

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3Config

    from medsft.training import build_lora_config

    config = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    counts = {}
    for version, script in (("v1", train_lora), ("v2", train_lora2)):
        cfg = SimpleNamespace(**{k: v for k, v in vars(script).items() if k.isupper()})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(model, build_lora_config(cfg, tied=True))
        counts[version] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        inner = model.get_base_model()
        assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert counts == {"v1": 69_730_304, "v2": 69_730_304 + 151936 * 2048}  # v2 adds the one tied embedding


def test_library_choices_are_checked_before_loading(tmp_path, sample_data_dir):
    with pytest.raises(UserError) as e:
        train_lora.main([f"--data_dir={sample_data_dir}", f"--output_dir={tmp_path}", "--optim=adamw",
                         "--target_modules=foo_proj", "--attn_implementation=flash_attention_3", "--lora_alpha=0",
                         "--max_steps=0", "--modules_to_save=lm_head,norm", "--model_path=/does/not/matter"])
    for part in ("optim 'adamw'", "target_modules", "attn_implementation", "lora_alpha", "max_steps", "modules_to_save"):
        assert part in str(e.value)


def test_a_hand_made_split_with_a_bad_row_names_its_line(tiny_model_dir, sample_data_dir, tmp_path):
    import shutil

    from medsft.errors import DataError

    data_dir = tmp_path / "d"
    shutil.copytree(sample_data_dir, data_dir)
    with (data_dir / "train.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"question": "只有问题，没有思考和回答"}\n')
    lines = len((data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines())
    with pytest.raises(DataError) as e:
        run(train_lora, tiny_model_dir, data_dir, tmp_path / "o", "--dry_run=True")
    assert e.value.line == lines and "missing field 'think'" in str(e.value)


def test_a_run_saved_before_a_setting_existed_resumes_as_it_behaved(tmp_path, capsys):
    """Settings added later (MASK_POLICY, NO_THINK_FRACTION, v2's EMBEDDING_MODE) count as what the old run did."""
    import json

    from medsft.resume import check_resume_settings
    from medsft.settings import Settings

    old = {"LEARNING_RATE": 2e-4, "OUTPUT_DIR": str(tmp_path)}  # a v3 run from before the three settings
    (tmp_path / "settings.json").write_text(json.dumps(old), encoding="utf-8")
    same = Settings(**old, MASK_POLICY="seed", NO_THINK_FRACTION=0.0, EMBEDDING_MODE="full",
                    EMBEDDING_LEARNING_RATE=2e-4)
    check_resume_settings(same, tmp_path / "settings.json")  # the old behaviour, spelled out: resumes
    expected = r"\(embedding_learning_rate 0.0002 → 5e-05, embedding_mode 'full' → 'tokens'\)"
    with pytest.raises(UserError, match=expected):
        check_resume_settings(Settings(**old, MASK_POLICY="seed", NO_THINK_FRACTION=0.0, EMBEDDING_MODE="tokens",
                                       EMBEDDING_LEARNING_RATE=5e-5), tmp_path / "settings.json")


def test_loss_png_is_drawn_from_metrics_and_a_missing_matplotlib_ends_no_run(tmp_path, monkeypatch):
    """plot_losses draws loss.png from metrics.jsonl; without matplotlib it draws nothing and says so by its
    return value, so a finished run (adapter and summary.json already written) does not end in an ImportError."""
    from medsft.training import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.5, "learning_rate": 0.0002}\n{"step": 1, "eval_loss": 2.4}\n',
                       encoding="utf-8")
    assert plot_losses(metrics, tmp_path / "loss.png", title="v1") is True
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert plot_losses(metrics, tmp_path / "again.png", title="v1") is False
    assert not (tmp_path / "again.png").exists()

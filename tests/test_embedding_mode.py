"""v2/v3's EMBEDDING_MODE on the tiny Qwen3: "tokens" trains only the rows of the data's tokens and keeps the tie,
through training, reloading, merging, inference and evaluation; "full" gets its own learning rate."""
import json

import pytest
import torch
from safetensors.torch import load_file

import train_lora2
from tests.conftest import FAST_TRAINING


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, short_data_dir) -> dict:
    """{mode: what train_lora2.main returned, with "final"}: "tokens" trained hard enough to move its rows,
    "full" one step (tests/test_merge.py trains, merges and evaluates it further)."""
    result = {}
    for mode, steps in (("tokens", []), ("full", ["--max_steps=1", "--eval_steps=1", "--save_steps=1"])):
        out = tmp_path_factory.mktemp(f"v2-{mode}")
        result[mode] = train_lora2.main([f"--model_path={tiny_model_dir}", f"--data_dir={short_data_dir}",
                                         f"--output_dir={out}", *FAST_TRAINING, *steps, "--learning_rate=1e-2",
                                         f"--embedding_mode={mode}", "--embedding_learning_rate=1e-3"])
        result[mode]["final"] = out / "final"
    return result


def base_embedding(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).model.embed_tokens.weight


def test_tokens_mode_trains_the_rows_of_the_datas_tokens_only_and_stays_tied(runs, tiny_model_dir, capsys):
    run = runs["tokens"]
    seen = sorted({t for example in run["data"].train_set for t in example["input_ids"]})
    config = json.loads((run["final"] / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": seen} and not config["modules_to_save"]

    inner = run["trainer"].model.get_base_model()
    embedding = inner.model.embed_tokens.weight.detach()  # PEFT's merged view: base rows + trained rows
    assert torch.equal(inner.lm_head.weight.detach(), embedding)  # the tied lm_head is the same matrix
    base = base_embedding(tiny_model_dir).float()
    absent = torch.ones(len(base), dtype=torch.bool)
    absent[seen] = False
    assert absent.sum() > 140_000 and torch.equal(embedding[absent], base[absent])  # bit for bit
    assert not torch.equal(embedding[seen], base[seen])  # the data's rows did move

    sizes = {mode: (r["final"] / "adapter_model.safetensors").stat().st_size for mode, r in runs.items()}
    with capsys.disabled():
        print(f"\nadapter_model.safetensors on the tiny model (hidden 64): tokens {sizes['tokens']:,} bytes "
              f"({len(seen):,} rows), full {sizes['full']:,} bytes (151,936 rows, saved twice)")
    assert sizes["tokens"] * 20 < sizes["full"]


def test_tokens_mode_merges_tied_with_the_unseen_rows_bit_identical(runs, tiny_model_dir, short_data_dir, tmp_path):
    import merge_lora
    from transformers import AutoModelForCausalLM

    run, out = runs["tokens"], tmp_path / "merged"
    record = merge_lora.main([f"--adapter_path={run['final']}", f"--output_dir={out}", f"--data_dir={short_data_dir}"])
    assert record["check"]["tied"] and record["check"]["embedding_is_the_trained_one"]
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    seen = json.loads((run["final"] / "adapter_config.json").read_text())["trainable_token_indices"]["embed_tokens"]
    base, weight = base_embedding(tiny_model_dir), merged.model.embed_tokens.weight
    absent = torch.ones(len(base), dtype=torch.bool)
    absent[seen] = False
    assert torch.equal(weight[absent], base[absent])
    delta = load_file(run["final"] / "adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert torch.equal(weight[seen], delta.to(torch.bfloat16))


def test_full_mode_trains_the_embedding_at_its_own_learning_rate(runs):
    groups = runs["full"]["trainer"].optimizer.param_groups
    embedding = [g for g in groups if g.get("embedding")]
    assert len(embedding) == 1 and len(embedding[0]["params"]) == 1
    assert embedding[0]["params"][0].shape == (151936, 64)
    assert embedding[0]["initial_lr"] == 1e-3 and all(g["initial_lr"] == 1e-2 for g in groups if not g.get("embedding"))
    assert not any(g.get("embedding") for g in runs["tokens"]["trainer"].optimizer.param_groups)


def test_inference_loads_either_mode_and_evaluate_reproduces_the_tokens_runs_val_loss(runs, tiny_model_dir,
                                                                                      short_data_dir, tmp_path):
    import evaluate
    import inference_lora

    for mode in ("tokens", "full"):  # evaluate.py and merge_lora.py on a "full" adapter: tests/test_merge.py
        reply = inference_lora.main([f"--model_path={tiny_model_dir}", f"--adapter_path={runs[mode]['final']}",
                                     "-q", "头痛怎么办？", "--max_new_tokens=4"])
        assert reply.new_tokens == 4
    final = runs["tokens"]["final"]
    report = evaluate.main([f"--model_path={tiny_model_dir}", f"--adapter_path={final}", f"--data_dir={short_data_dir}",
                            f"--report_path={tmp_path / 'eval.json'}"])
    best = json.loads((final.parent / "summary.json").read_text())["best_val_loss"]
    assert report["val_loss"] == pytest.approx(best, abs=1e-3)  # the same model as training validated


def test_v3_trains_the_rows_of_its_mask_placeholders_too(tokenizer, short_data_dir, tmp_path):
    import train_lora3
    from medsft.masking import MaskedQuestionDataset
    from medsft.settings import parse_settings
    from medsft.training import trained_token_indices
    from medsft.training_data import load_training_data

    cfg = parse_settings(vars(train_lora3), [f"--data_dir={short_data_dir}", "--mask_style=progressive"])
    data = load_training_data(cfg, tokenizer)
    plain = sorted({t for e in data.train_set for t in e["input_ids"]})
    data.train_set = MaskedQuestionDataset(data.train_rows, tokenizer, cfg)
    rows = trained_token_indices(data, cfg)
    placeholders = {t for text in ("[MASK]", "[疾病]", "[症状]") for t in tokenizer.encode(text)}
    assert set(plain) < set(rows) and placeholders & (set(rows) - set(plain))

"""merge_lora.py on the tiny Qwen3: a plain, tied model folder that matches base+adapter, and clean refusals."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import merge_lora
from medsft import model_export
from medsft.errors import UserError
from tests.conftest import gpu

IDS = [151644, 8948, 198, 100, 200, 300, 151645, 198, 151644, 77091, 198, 151667, 198, 400, 500]


@pytest.fixture(scope="module")
def adapters(train_once, short_data_dir) -> dict:
    """v1 (LoRA only) and v2 (LoRA + the whole tied embedding) finals, trained hard enough to move the logits.
    (v2's default, embedding_mode="tokens", is merged in tests/test_embedding_mode.py.)"""
    return {"v1": train_once("v1", short_data_dir, "--learning_rate=1e-2")[0] / "final",
            "v2": train_once("v2", short_data_dir, "--learning_rate=1e-2", "--embedding_mode=full")[0] / "final"}


@pytest.fixture(scope="module")
def merged(adapters, tmp_path_factory, short_data_dir) -> dict:
    """{version: (merged folder, what main returned)}; the base and DATA_DIR come from the adapter's run."""
    folders = {}
    for version, adapter in adapters.items():
        out = tmp_path_factory.mktemp(f"merged-{version}") / "model"
        record = merge_lora.main([f"--adapter_path={adapter}", f"--output_dir={out}", "--max_shard_size=10MB"])
        assert record["settings"]["DATA_DIR"] == str(short_data_dir)  # the run's, so the check uses its val rows
        folders[version] = (out, record)
    return folders


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def base_plus_adapter(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16).float()
    return PeftModel.from_pretrained(base, str(adapter_dir)).float().eval()


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(argv) -> str:
    with pytest.raises(UserError) as e:
        merge_lora.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_merged_model_loads_without_peft_matches_base_plus_adapter_and_stays_tied(version, merged, adapters,
                                                                                  tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    folder, record = merged[version]
    assert not (folder / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert type(model) is Qwen3ForCausalLM and model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight  # one matrix, as in Qwen3

    reference_model = base_plus_adapter(tiny_model_dir, adapters[version])
    reference = logits(reference_model)
    with reference_model.disable_adapter():
        base = logits(reference_model)
    difference = (logits(model.float()) - reference).abs().max().item()
    effect = (base - reference).abs().max().item()
    assert difference <= model_export.RELATIVE_TOLERANCE * reference.abs().max().item()
    assert effect > 20 * difference  # the adapter really moves the logits, and the merge carries that move

    embedding = AutoModelForCausalLM.from_pretrained(str(folder)).model.embed_tokens.weight
    base_embedding = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).model.embed_tokens.weight
    if version == "v2":  # the shared matrix is the trained embedding, not the base's copy
        trained = load_file(adapters[version] / "adapter_model.safetensors")["base_model.model.model.embed_tokens.weight"]
        assert torch.equal(embedding, trained.to(torch.bfloat16))
        assert not torch.equal(embedding, base_embedding)
    else:
        assert torch.equal(embedding, base_embedding)

    check = record["check"]
    assert check["tied"] and check["embedding_is_the_trained_one"]
    assert check["max_abs_logit_difference"] <= check["tolerance"] * check["max_abs_logit"]
    assert check["adapter_effect"] > 20 * check["max_abs_logit_difference"]
    assert check["source"].endswith("val.jsonl") and check["tokens_compared"] > 50


def test_the_folder_has_shards_config_thinking_sampling_tokenizer_settings_and_merge_json(merged, adapters,
                                                                                          tiny_model_dir):
    folder, record = merged["v2"]
    names = set(everything_under(folder))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "settings.json", "merge.json"} <= names
    assert len([n for n in names if n.startswith("model-000")]) == 2  # --max_shard_size=10MB splits the tiny model
    assert not [n for n in names if n.endswith(".tmp")]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]
    assert (generation["do_sample"], generation["temperature"], generation["top_p"], generation["top_k"]) \
        == (True, 0.6, 0.95, 20)
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert json.loads((folder / "settings.json").read_text()) == json.loads((adapters["v2"] / "settings.json").read_text())
    saved = json.loads((folder / "merge.json").read_text())
    assert saved == record
    assert saved["base"] == str(tiny_model_dir) and saved["adapter"] == str(adapters["v2"])
    assert {"torch", "transformers", "peft"} <= set(saved["versions"])
    assert (folder / "model-00001-of-00002.safetensors").stat().st_mode & 0o044  # readable by a server's user too

    from medsft.model_loading import load_tokenizer

    assert load_tokenizer(str(folder)).chat_template  # renders Qwen3's template with <think> blocks


def test_inference_and_evaluate_take_the_merged_folder_with_an_empty_adapter_path(merged, adapters, tiny_model_dir,
                                                                                  short_data_dir, tmp_path, capsys):
    import evaluate
    import inference_lora

    folder, _ = merged["v2"]
    reply = inference_lora.main([f"--model_path={folder}", "--adapter_path=", "-q", "高血压患者头痛怎么办？",
                                 "--max_new_tokens=8"])
    out = capsys.readouterr().out
    assert f"loaded {folder} (no adapter)" in out and "[finish:" in out and reply.new_tokens == 8

    reports = {}
    for name, model_path, adapter, precision in (("merged", folder, "", []),  # a merged folder: bf16 by default
                                                 ("adapter", tiny_model_dir, adapters["v2"], ["--load_in_4bit=False"])):
        reports[name] = evaluate.main([f"--model_path={model_path}", f"--adapter_path={adapter}",
                                       f"--data_dir={short_data_dir}", f"--report_path={tmp_path / name}.json",
                                       *precision, "--no_think_check=0"])
    out = capsys.readouterr().out
    assert re.search(r"max_length += 320  \(from the run\)", out)
    assert f"load_in_4bit = False: {folder} is a whole trained model" in out
    assert reports["merged"]["load_in_4bit"] is False and reports["adapter"]["load_in_4bit"] is False
    assert reports["merged"]["val_loss"] == pytest.approx(reports["adapter"]["val_loss"], abs=0.02)
    # merge.json's three losses are evaluate.py's, on the same rows (all of this val split: 2 rows <= 8)
    val_loss = json.loads((folder / "merge.json").read_text())["val_loss"]
    assert val_loss["examples"] == reports["merged"]["val_examples"] == 2
    for name, key in (("merged", "merged"), ("adapter", "bf16_base_plus_adapter")):
        assert val_loss[key] == pytest.approx(reports[name]["val_loss"], abs=2e-4), key


def test_the_web_demo_chats_with_the_merged_folder(merged):
    from types import SimpleNamespace

    import web_demo
    from medsft.assistant import MedicalAssistant

    folder, _ = merged["v2"]
    chat = web_demo.WebChat(MedicalAssistant(str(folder), None), 4096, 2000)
    steps = list(chat.respond("高血压患者头痛怎么办？", [], [], "", 0.0, 0.95, 8, SimpleNamespace(session_hash="m")))
    _, messages, history = steps[-1]
    assert len(history) == 1 and history[0][0] == "高血压患者头痛怎么办？"
    finish = messages[-1].content if hasattr(messages[-1], "content") else messages[-1]["content"]
    assert "8 tokens" in str(finish) or "max_new_tokens=8" in str(finish)


def test_an_existing_output_is_kept_and_replaced_only_with_overwrite(adapters, short_data_dir, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("an earlier merge")
    message = refused([f"--adapter_path={adapters['v1']}", f"--output_dir={out}"])
    assert "already exists" in message and "--overwrite=True" in message
    assert everything_under(tmp_path) == ["model", "model/old.txt"]

    merge_lora.main([f"--adapter_path={adapters['v1']}", f"--output_dir={out}", "--overwrite=True",
                     f"--data_dir={short_data_dir}", "--measure_examples=0"])
    assert not (out / "old.txt").exists() and (out / "merge.json").is_file() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # neither the old folder nor a temporary one is left


def test_a_missing_adapter_is_refused_and_nothing_is_written(adapters, tmp_path):
    message = refused([f"--adapter_path={tmp_path / 'nope'}", f"--output_dir={tmp_path / 'model'}"])
    assert "not found" in message and str(tmp_path / "nope") in message
    assert everything_under(tmp_path) == []
    run_folder = adapters["v1"].parent  # OUTPUT_DIR instead of OUTPUT_DIR/final
    message = refused([f"--adapter_path={run_folder}", f"--output_dir={tmp_path / 'model'}"])
    assert "no adapter_config.json" in message and f"did you mean {run_folder / 'final'}?" in message
    assert everything_under(tmp_path) == []


def test_a_base_of_another_shape_is_refused_and_nothing_is_written(adapters, tmp_path):
    from medsft.tiny_model import build_tiny_qwen3

    other = build_tiny_qwen3(tmp_path / "other-base", hidden=32, intermediate=64)
    before = everything_under(tmp_path)
    message = refused([f"--model_path={other}", f"--adapter_path={adapters['v1']}", f"--output_dir={tmp_path / 'm'}"])
    recorded = json.loads((adapters["v1"] / "settings.json").read_text())["MODEL_PATH"]
    assert f"--model_path {other} (hidden size 32, intermediate size 64, layers 2) is not the shape of {recorded} " \
           "(hidden size 64, intermediate size 128, layers 2)" in message
    assert everything_under(tmp_path) == before


def test_an_unwritable_output_is_refused_and_nothing_is_written(adapters, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    message = refused([f"--adapter_path={adapters['v1']}", f"--output_dir={tmp_path / 'a-file' / 'model'}"])
    assert "cannot be written" in message
    assert everything_under(tmp_path) == ["a-file"]


def test_a_quantised_base_is_refused(adapters, tiny_model_dir, tmp_path):
    base = tmp_path / "base-4bit"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    message = refused([f"--model_path={base}", f"--adapter_path={adapters['v1']}", f"--output_dir={tmp_path / 'm'}"])
    assert "quantised" in message and "bitsandbytes" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-4bit"]


def test_a_merge_that_loses_the_adapter_fails_the_check_and_writes_nothing(adapters, short_data_dir, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.setattr(merge_lora, "merge_adapter", lambda model: model.unload())  # drops the LoRA weights
    message = refused([f"--adapter_path={adapters['v1']}", f"--output_dir={tmp_path / 'new' / 'folders' / 'm'}",
                       f"--data_dir={short_data_dir}", "--measure_examples=0"])
    assert "logits differ from base+adapter" in message and "nothing was written" in message
    assert everything_under(tmp_path) == []


@pytest.mark.parametrize("failure", ["untied", "tied_to_the_base_copy"])
def test_a_merge_that_unties_or_ties_to_the_base_embedding_fails_the_check_and_writes_nothing(
        failure, adapters, short_data_dir, tmp_path, monkeypatch):
    """peft#2777's failures: lm_head and embed_tokens saved as two matrices, or the shared one is the base's copy."""
    def broken_merge(model):
        original = model.get_base_model().model.embed_tokens.original_module.weight.detach().clone()
        merged_model = model_export.merge_adapter(model)
        merged_model.model.embed_tokens.weight = torch.nn.Parameter(original)
        if failure == "tied_to_the_base_copy":
            merged_model.lm_head.weight = merged_model.model.embed_tokens.weight
        return merged_model

    monkeypatch.setattr(merge_lora, "merge_adapter", broken_merge)
    message = refused([f"--adapter_path={adapters['v2']}", f"--output_dir={tmp_path / 'm'}",
                       f"--data_dir={short_data_dir}", "--measure_examples=0"])
    expected = "is not tied" if failure == "untied" else "embedding is not the adapter's trained one"
    assert expected in message and "nothing was written" in message
    assert everything_under(tmp_path) == []


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_merge_json_holds_the_val_loss_of_nf4_base_plus_adapter_bf16_base_plus_adapter_and_the_merged_folder(
        version, merged, adapters):
    folder, record = merged[version]
    val_loss = record["val_loss"]
    assert json.loads((folder / "merge.json").read_text())["val_loss"] == val_loss
    assert val_loss["validated"] == "nf4_base_plus_adapter" and val_loss["merge_into"] == "bf16"
    assert val_loss["data"].endswith("val.jsonl") and val_loss["rows"] == val_loss["examples"] == 2  # all of val (<= 8)
    assert val_loss["tokens"] > 50 and val_loss["max_length"] == 320  # the run's max_length, as evaluate.py uses
    nf4, bf16, merged_loss = (val_loss[k] for k in ("nf4_base_plus_adapter", "bf16_base_plus_adapter", "merged"))
    assert all(0 < loss < 20 for loss in (nf4, bf16, merged_loss))
    # as validated: the run's own eval loss of best/ on the same (whole) val split, as evaluate.py reproduces it
    assert nf4 == pytest.approx(json.loads((adapters[version].parent / "summary.json").read_text())["best_val_loss"],
                                abs=2e-4)
    assert merged_loss == pytest.approx(bf16, abs=0.02)  # merged into bf16: it is bf16 base + adapter
    assert val_loss["gap_to_validated"] == pytest.approx({"bf16_base_plus_adapter": bf16 - nf4,
                                                          "merged": merged_loss - nf4}, abs=2e-6)


def test_merging_into_the_dequantized_nf4_base_adds_the_adapter_to_the_weights_it_trained_against(
        adapters, merged, tiny_model_dir, short_data_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from medsft.model_loading import load_base_model

    out = tmp_path / "m"
    record = merge_lora.main([f"--adapter_path={adapters['v1']}", f"--output_dir={out}", f"--data_dir={short_data_dir}",
                              "--merge_into=dequantized_nf4", "--measure_examples=1"])
    assert "merged into the dequantized_nf4 base" in capsys.readouterr().out
    val_loss = record["val_loss"]
    assert record["merge_into"] == val_loss["merge_into"] == "dequantized_nf4"
    assert val_loss["rows"] == val_loss["examples"] == 1  # capped by --measure_examples, and recorded
    assert record["check"]["tied"] and "quantization_config" not in json.loads((out / "config.json").read_text())

    # the two merges differ by the base's NF4 rounding only: merged - base is the same adapter delta in both
    name = "model.layers.0.mlp.down_proj.weight"
    nf4_base = load_base_model(str(tiny_model_dir), load_in_4bit=True)
    nf4_base.dequantize()
    bf16_base = load_file(tiny_model_dir / "model.safetensors")[name].float()
    dequantized = nf4_base.state_dict()[name].float()
    into_nf4 = load_file(out / "model.safetensors")[name].float()
    into_bf16 = load_file(merged["v1"][0] / "model-00001-of-00002.safetensors") | load_file(
        merged["v1"][0] / "model-00002-of-00002.safetensors")
    into_bf16 = into_bf16[name].float()
    torch.testing.assert_close(into_nf4 - dequantized, into_bf16 - bf16_base, rtol=0, atol=2e-3)
    assert (into_nf4 - into_bf16).abs().max() > 4 * 2e-3 and (dequantized - bf16_base).abs().max() > 4 * 2e-3


def test_merge_into_and_measure_examples_are_checked(adapters, tmp_path):
    message = refused([f"--adapter_path={adapters['v1']}", f"--output_dir={tmp_path / 'm'}", "--merge_into=fp8"])
    assert "merge_into must be one of bf16, dequantized_nf4, not 'fp8'" in message
    message = refused([f"--adapter_path={adapters['v1']}", f"--output_dir={tmp_path / 'm'}", "--measure_examples=-2"])
    assert "measure_examples must be -1 (auto), 0 (none) or more" in message
    bf16_adapter = tmp_path / "bf16-adapter"  # an adapter trained with --load_in_4bit=False
    shutil.copytree(adapters["v1"], bf16_adapter)
    settings = json.loads((bf16_adapter / "settings.json").read_text()) | {"LOAD_IN_4BIT": False}
    (bf16_adapter / "settings.json").write_text(json.dumps(settings))
    message = refused([f"--adapter_path={bf16_adapter}", f"--output_dir={tmp_path / 'm'}",
                       "--merge_into=dequantized_nf4"])
    assert "was trained on a bf16 base" in message and "merge it into bf16" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16-adapter"]


def test_check_examples_come_from_val_jsonl_or_built_in_prompts(tokenizer, short_data_dir, tmp_path):
    examples, source = model_export.check_examples(tokenizer, short_data_dir, count=4, max_tokens=40)
    assert source.endswith("val.jsonl") and 1 <= len(examples) <= 4 and all(len(e) <= 40 for e in examples)
    examples, source = model_export.check_examples(tokenizer, tmp_path, count=2)
    assert source == "built-in prompts" and len(examples) == 2
    assert tokenizer.decode(examples[0]).endswith("<|im_end|>\n")  # whole training texts: the reply is compared too


def test_the_recorded_base_is_settings_json_then_adapter_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen3-0.6B"}))
    assert model_export.recorded_base(tmp_path) == "Qwen/Qwen3-0.6B"
    (tmp_path / "settings.json").write_text(json.dumps({"MODEL_PATH": "/models/Qwen3-1.7B"}))
    assert model_export.recorded_base(tmp_path) == "/models/Qwen3-1.7B"


# ---------------------------------------------------------------------------------------------------------
# deploy/: the Ollama Modelfile and the OpenAI client example

ROOT = Path(__file__).resolve().parent.parent


def test_the_modelfile_uses_the_training_prompt_both_end_tokens_and_thinking_sampling():
    from medsft.chat_format import SYSTEM_PROMPT

    text = (ROOT / "deploy" / "Modelfile").read_text(encoding="utf-8")
    parameters = [line.split(None, 2)[1:] for line in text.splitlines() if line.startswith("PARAMETER ")]
    assert [value for name, value in parameters if name == "stop"] == ['"<|im_end|>"', '"<|endoftext|>"']
    sampling = {name: float(value) for name, value in parameters if name in ("temperature", "top_p", "top_k")}
    assert sampling == {k: v for k, v in model_export.THINKING_SAMPLING.items() if k != "do_sample"}
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    for piece in ("<|im_start|>system\n{{ .System }}<|im_end|>\n", "<|im_start|>user\n{{ .Content }}<|im_end|>\n",
                  "<|im_start|>assistant\n{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ end }}"):
        assert piece in template


def test_the_client_example_prints_the_reasoning_and_the_answer_apart(tmp_path):
    """Against a stand-in server that answers as vLLM's qwen3 reasoning parser does (vLLM is not installed here)."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    requests = []

    class VLLMLike(BaseHTTPRequestHandler):
        def do_POST(self):
            requests.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            field = "reasoning" if len(requests) == 1 else "reasoning_content"  # vLLM >= 0.11.2, and older
            message = {"role": "assistant", field: "用户问的是血糖。", "content": "可以少量吃低糖水果。"}
            body = json.dumps({"id": "1", "object": "chat.completion", "created": 0, "model": "qwen3-medical",
                               "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), VLLMLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "OPENAI_BASE_URL": f"http://127.0.0.1:{server.server_port}/v1",
               "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        outputs = [subprocess.run([sys.executable, str(ROOT / "deploy" / "openai_client.py"), "糖尿病人可以吃水果吗？"],
                                  env=env, capture_output=True, text=True, timeout=60) for _ in range(2)]
    finally:
        server.shutdown()
    for result in outputs:
        assert result.returncode == 0, result.stderr
        assert result.stdout == ("==== 思考 / reasoning ====\n用户问的是血糖。\n==== 回答 / answer ====\n"
                                 "可以少量吃低糖水果。\n")
    path, request = requests[0]
    assert path == "/v1/chat/completions" and request["model"] == "qwen3-medical"
    assert (request["temperature"], request["top_p"], request["top_k"]) == (0.6, 0.95, 20)
    from medsft.chat_format import SYSTEM_PROMPT

    assert request["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                   {"role": "user", "content": "糖尿病人可以吃水果吗？"}]


def test_qwen3_1_7b_parameter_count_behind_the_readme_memory_table():
    """The real Qwen3-1.7B shape on the meta device: the README derives memory per format from these counts."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    linear = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    assert (total, embedding, linear) == (1_720_574_976, 311_164_928, 1_409_286_144)
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    assert kv_bytes_per_token == 114_688  # bf16 K and V of every layer


GO_RENDER = r"""package main

import (
	"encoding/json"
	"os"
	"text/template"
)

// the fields Ollama passes its templates (server/template: Values, api.Message)
type Message struct{ Role, Content, Thinking string }
type Values struct {
	System            string
	Messages          []Message
	Think, IsThinkSet bool
}

func main() {
	source, _ := os.ReadFile(os.Args[1])
	tmpl := template.Must(template.New("t").Parse(string(source)))
	var cases []Values
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var rendered []string
	for _, values := range cases {
		var out bytes.Buffer
		if err := tmpl.Execute(&out, values); err != nil {
			panic(err)
		}
		rendered = append(rendered, out.String())
	}
	json.NewEncoder(os.Stdout).Encode(rendered)
}
""".replace('"encoding/json"', '"bytes"\n\t"encoding/json"')

# (history as (question, think, answer), question, Ollama's think setting: None = not set, True, False)
MODELFILE_CASES = [
    ([], "胸痛持续了3天，需要立即就医吗？", None),
    ([("糖尿病人可以吃水果吗？", "", "可以少量吃低糖水果。")], "那苹果呢？", None),
    ([("糖尿病人可以吃水果吗？", "用户问糖尿病与水果。\n要看血糖控制。", "可以少量吃低糖水果。")], "那苹果呢？", None),
    ([("糖尿病人可以吃水果吗？", "用户问糖尿病与水果。", "可以少量吃低糖水果。")], "那苹果呢？", True),
    ([], "胸痛持续了3天，需要立即就医吗？", False),
    ([("糖尿病人可以吃水果吗？", "用户问糖尿病与水果。", "可以少量吃低糖水果。")], "那苹果呢？", False),
]


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go (Ollama's templates are Go text/template)")
def test_the_modelfile_template_renders_what_qwen3s_chat_template_renders(tokenizer, tmp_path):
    """Go's text/template, which Ollama uses, on the data Ollama passes (.System, .Messages with each reply's think
    apart in .Thinking, .Think and .IsThinkSet), against apply_chat_template on the same chat: earlier replies'
    thinks dropped, and Ollama's think setting off rendered as enable_thinking=False."""
    import subprocess

    from medsft.chat_format import SYSTEM_PROMPT, format_reply

    text = (ROOT / "deploy" / "Modelfile").read_text(encoding="utf-8")
    (tmp_path / "template.txt").write_text(text.split('TEMPLATE """', 1)[1].split('"""', 1)[0], encoding="utf-8")
    (tmp_path / "render.go").write_text(GO_RENDER)
    cases, expected = [], []
    for history, question, think in MODELFILE_CASES:
        ollama = [{"Role": "system", "Content": SYSTEM_PROMPT}]
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for q, t, a in history:
            ollama += [{"Role": "user", "Content": q}, {"Role": "assistant", "Content": a, "Thinking": t}]
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": format_reply(t, a)}]
        ollama.append({"Role": "user", "Content": question})
        messages.append({"role": "user", "content": question})
        cases.append({"System": SYSTEM_PROMPT, "Messages": ollama, "Think": bool(think), "IsThinkSet": think is not None})
        expected.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                      enable_thinking=think is not False))
    rendered = subprocess.run(["go", "run", "render.go", "template.txt"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "GOCACHE": str(tmp_path / "cache")},
                              input=json.dumps(cases))
    assert rendered.returncode == 0, rendered.stderr
    outputs = json.loads(rendered.stdout)
    for case, output, wanted in zip(MODELFILE_CASES, outputs, expected):
        assert output == wanted, case
    assert "用户问糖尿病与水果" not in outputs[2] and "用户问糖尿病与水果" in format_reply("用户问糖尿病与水果。", "")
    assert outputs[4].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off: the empty block
    assert outputs[0].endswith("<|im_start|>assistant\n") and outputs[3] == outputs[2]  # on, or unset: the model thinks


@gpu
def test_merging_on_the_gpu_matches_the_cpu_merge(adapters, merged, short_data_dir, tmp_path):
    from safetensors.torch import load_file

    record = merge_lora.main([f"--adapter_path={adapters['v2']}", f"--output_dir={tmp_path / 'm'}", "--device=cuda",
                              f"--data_dir={short_data_dir}", "--max_shard_size=10MB", "--measure_examples=0"])
    assert record["device"] == "cuda" and record["check"]["tied"]
    cpu_folder = merged["v2"][0]
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        gpu_weights, cpu_weights = load_file(tmp_path / "m" / shard), load_file(cpu_folder / shard)
        assert gpu_weights.keys() == cpu_weights.keys()
        for name in gpu_weights:  # float32 merges on either device, rounded once to bf16: at most one bf16 step apart
            torch.testing.assert_close(gpu_weights[name].float(), cpu_weights[name].float(), rtol=1e-2, atol=1e-3)


def test_write_model_folder_is_reusable_for_any_finished_model(tiny_model_dir, tokenizer, tmp_path):
    """What a full fine-tune script calls: the same plain folder, written atomically, never over an existing one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).float()
    out = model_export.write_model_folder(tmp_path / "full", model, tokenizer, settings={"VERSION": "full"},
                                          extra_files={"train.json": {"steps": 3}})
    assert json.loads((out / "settings.json").read_text()) == {"VERSION": "full"}
    assert json.loads((out / "train.json").read_text()) == {"steps": 3}
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert reloaded.dtype == torch.bfloat16 and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with pytest.raises(UserError, match="already exists"):
        model_export.write_model_folder(out, model, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]

"""The downloads, run for real: the installed ModelScope SDK and huggingface_hub against a local stand-in of both hubs.

The SDKs run in a subprocess, as a user runs them: they read their endpoint and cache settings at import.
"""
import json
import os
import subprocess
import sys

import pytest

from medsft.hub_download import HUB_ATTEMPTS, HUB_TIMEOUT_S
from tests.conftest import ROOT, SAMPLE
from tests.hub_standin import HubStandIn, Repo

DATASET = "krisfu/delicate_medical_r1_data"
DATASET_FILES = {"README.md": b"# delicate_medical_r1_data\n\nChinese medical R1 data.\n",
                 ".gitattributes": b"*.jsonl filter=lfs diff=lfs merge=lfs -text\n",
                 "dataset_infos.json": b'{"default": {"features": {"question": {"dtype": "string"}}}}\n',
                 "r1_data_example.jsonl": SAMPLE.read_bytes()}
TRAINING_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja"}
RESOLVE = """import sys
from medsft.model_loading import check_model_folder, resolve_model_path
for arg in sys.argv[1:]:  # dry:ID = what a dry run fetches
    dry = arg.startswith("dry:")
    print("MODEL", check_model_folder(resolve_model_path(arg.removeprefix("dry:"), dry), dry), flush=True)
"""


def make_standin(model_dir=None) -> HubStandIn:
    standin = HubStandIn()
    dataset = standin.modelscope[("dataset", DATASET)] = Repo(DATASET_FILES, "master")
    first_20 = b"".join(SAMPLE.read_bytes().splitlines(keepends=True)[:20])
    dataset.add_revision("v1.0", {**DATASET_FILES, "r1_data_example.jsonl": first_20})
    if model_dir:  # the tiny Qwen3, beside what a real repo holds and training does not need
        files = {p.name: p.read_bytes() for p in model_dir.iterdir()}
        files |= {"README.md": b"# Tiny\n", "LICENSE": b"Apache-2.0\n", ".gitattributes": b"*.bin filter=lfs\n",
                  "pytorch_model.bin": b"\0" * 4096}
        standin.modelscope[("model", "Qwen/TinyOnBoth")] = Repo(files, "master")
        standin.hub[("model", "Qwen/TinyOnBoth")] = Repo(files, "main")
        standin.hub[("model", "Qwen/TinyOnHubOnly")] = Repo(files, "main")
    return standin.start()


@pytest.fixture(scope="module")
def standin(tiny_model_dir):
    server = make_standin(tiny_model_dir)
    yield server
    server.stop()


def run(args, standin, cache, settings=None, **popen):
    """A script in a fresh process, with the SDKs' settings pointing at the stand-in and a cache under `cache`."""
    # none of the caller's: an offline cluster's HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1, which huggingface_hub
    # reads too) would keep the Hub to its cache; these tests go online unless a test says otherwise
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELSCOPE_", "HF_", "TRANSFORMERS_OFFLINE"))}
    env |= {**standin.env(), "MODELSCOPE_CACHE": str(cache / "modelscope"), "HF_HOME": str(cache / "hf"),
            "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(settings or {})}
    env = {k: v for k, v in env.items() if v is not None}
    command = [sys.executable, *args]
    if popen:
        return subprocess.Popen(command, env=env, cwd=cache, text=True, **popen)
    return subprocess.run(command, env=env, cwd=cache, capture_output=True, text=True, timeout=90)


def error_line(result) -> str:
    """The one line the user sees: no traceback, and no other line starting with 'error'."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_data_py_downloads_pins_a_revision_and_reruns_from_the_cache(tmp_path):
    standin = make_standin()
    first = run([str(ROOT / "data.py"), "--data_dir=out"], standin, tmp_path)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    snapshot = tmp_path / "modelscope" / "datasets" / "krisfu--delicate_medical_r1_data" / "snapshots" / "master"
    assert manifest["source_files"] == [str(snapshot / "r1_data_example.jsonl")]  # not the README, not the metadata
    assert manifest["source_revision"] == "master" and manifest["counts"] == {"val": 5, "train": 45}
    listings = standin.requests(f"/api/v1/datasets/{DATASET}/repo/tree")
    assert [r["query"]["Revision"] for r in listings] == ["master"] and listings[0]["status"] == 200

    pinned = run([str(ROOT / "data.py"), "--data_dir=v1", "--revision=v1.0"], standin, tmp_path)
    assert pinned.returncode == 0, pinned.stderr
    manifest_v1 = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert manifest_v1["source_revision"] == "v1.0" and manifest_v1["rows_read"] == 20
    files = standin.requests(f"/api/v1/datasets/{DATASET}/repo")
    assert {r["query"]["Revision"] for r in files if r["query"].get("FilePath") == "r1_data_example.jsonl"} \
        == {"master", "v1.0"}

    standin.stop()  # nothing listens on that port any more: the cache answers
    offline = run([str(ROOT / "data.py"), "--data_dir=again"], standin, tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert "did not answer; using the cached copy" in offline.stdout
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["content_sha256"] == manifest["content_sha256"]
    never = run([str(ROOT / "data.py"), "--data_dir=v2", "--revision=v2.0"], standin, tmp_path)
    line = error_line(never)
    assert f"'{DATASET}' at revision 'v2.0'" in line and f"{HUB_ATTEMPTS} attempts" in line


def test_the_deprecated_modelscope_domain_setting_still_works_and_a_wrong_dataset_id_is_named(standin, tmp_path):
    domain = {"MODELSCOPE_ENDPOINT": None, "MODELSCOPE_DOMAIN": standin.url}  # the older setting, still honoured
    start = len(standin.log)
    result = run([str(ROOT / "data.py"), "--data_dir=out", "--source=krisfu/no_such_dataset"], standin, tmp_path,
                 domain)
    line = error_line(result)
    assert "'krisfu/no_such_dataset'" in line and "has no dataset" in line and standin.url in line
    assert [r["status"] for r in standin.log[start:]] == [404]  # asked once, at the stand-in
    assert "--source=data/sample.jsonl" in line


def test_a_model_id_downloads_only_what_training_needs_from_modelscope_then_the_hub(standin, tmp_path):
    start = len(standin.log)
    result = run(["-c", RESOLVE, "dry:Qwen/TinyOnBoth", "Qwen/TinyOnBoth"], standin, tmp_path)
    assert result.returncode == 0, result.stderr
    folder = result.stdout.split("MODEL ")[-1].strip()
    assert folder.startswith(str(tmp_path / "modelscope")) and set(os.listdir(folder)) == TRAINING_FILES
    fetched = [r["query"].get("FilePath") for r in standin.log[start:] if r["path"].endswith("/repo")]
    assert sorted(fetched) == sorted(TRAINING_FILES)  # no README, LICENSE or .bin weights, and nothing twice
    assert fetched[-1] == "model.safetensors"  # the dry run fetched all but the weights

    start = len(standin.log)
    result = run(["-c", RESOLVE, "Qwen/TinyOnHubOnly", "Qwen/NoSuchModel"], standin, tmp_path)
    line = error_line(result)  # the second id: on neither hub
    assert "'Qwen/NoSuchModel'" in line and line.count("has no model") == 2 and "--model_path=" in line
    folder = result.stdout.split("MODEL ")[-1].splitlines()[0]
    assert folder.startswith(str(tmp_path / "hf")) and set(os.listdir(folder)) == TRAINING_FILES
    log = [r for r in standin.log[start:] if "NoSuchModel" not in r["path"]]
    assert log[0]["path"] == "/api/v1/models/Qwen/TinyOnHubOnly/repo/files" and log[0]["status"] == 404
    fetched = {r["path"].rsplit("/", 1)[-1] for r in log if "/resolve/" in r["path"] and r["method"] == "GET"}
    assert fetched == TRAINING_FILES


def test_hf_hub_offline_is_named_when_it_kept_the_hub_to_an_empty_cache(standin, tmp_path):
    start = len(standin.log)
    result = run(["-c", RESOLVE, "Qwen/TinyOnHubOnly"], standin, tmp_path, {"HF_HUB_OFFLINE": "1"})
    line = error_line(result)
    assert "ModelScope" in line and "has no model 'Qwen/TinyOnHubOnly'" in line  # asked, and it has none
    assert "the Hugging Face Hub was not asked: HF_HUB_OFFLINE=1 is set (offline mode)" in line
    assert "unset HF_HUB_OFFLINE to download it" in line
    assert not [r for r in standin.log[start:] if r["path"].startswith("/api/models/")]  # the Hub was not asked


def test_an_unanswering_modelscope_ends_in_one_line_after_bounded_tries(tmp_path):
    standin = make_standin()
    standin.failing = {"/": "hang"}  # takes each request and never answers
    try:
        result = run([str(ROOT / "data.py"), "--data_dir=out"], standin, tmp_path)
    finally:
        standin.stop()
    line = error_line(result)
    assert f"{HUB_ATTEMPTS} attempts, {HUB_TIMEOUT_S} s timeout each" in line and DATASET in line
    tries = standin.requests(f"/api/v1/datasets/{DATASET}/repo/tree")
    assert len(tries) == len(standin.log) == HUB_ATTEMPTS
    waited = [r["closed_at"] - r["at"] for r in tries]  # when the client gave up on each
    assert all(HUB_TIMEOUT_S - 0.5 < w < HUB_TIMEOUT_S + 1.5 for w in waited), waited
    assert tries[-1]["closed_at"] - tries[0]["at"] < 11  # 2 tries of 4 s and a 1 s pause: about 10 s
    assert not (tmp_path / "out").exists()


def test_failing_hubs_are_tried_a_bounded_number_of_times_each(standin, tmp_path):
    standin.failing, start = {"/api/v1/": "503", "/api/models/": "hang"}, len(standin.log)
    try:
        result = run(["-c", RESOLVE, "Qwen/TinyOnBoth"], standin, tmp_path)
    finally:
        standin.failing = {}
    line = error_line(result)
    assert "ModelScope" in line and "Hugging Face Hub" in line and "'Qwen/TinyOnBoth'" in line
    assert line.count(f"did not answer for model 'Qwen/TinyOnBoth': {HUB_ATTEMPTS} attempts, {HUB_TIMEOUT_S} s") == 2
    log = [r for r in standin.log[start:] if r["path"] != "/api/agent-harnesses"]  # the Hub library's telemetry
    modelscope = [r for r in log if r["path"] == "/api/v1/models/Qwen/TinyOnBoth/repo/files"]
    hub = [r for r in log if r["path"] == "/api/models/Qwen/TinyOnBoth/revision/main"]
    assert len(modelscope) == len(hub) == HUB_ATTEMPTS and len(log) == 2 * HUB_ATTEMPTS
    assert [r["status"] for r in modelscope] == [503] * HUB_ATTEMPTS
    waited = [r["closed_at"] - r["at"] for r in hub]
    assert all(HUB_TIMEOUT_S - 0.5 < w < HUB_TIMEOUT_S + 1.5 for w in waited), waited
    assert hub[-1]["closed_at"] - hub[0]["at"] < 11


def test_an_interrupted_download_completes_on_the_rerun(tmp_path):
    standin = make_standin()
    standin.stall_file = "r1_data_example.jsonl"
    try:
        first = run([str(ROOT / "data.py"), "--data_dir=out"], standin, tmp_path,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert standin.stalled.wait(60), "the download never started"
        first.kill()  # the connection drops midway, as when a user's network or session does
        first.wait(30)
        standin.stall_file = None
        standin.release.set()
        second = run([str(ROOT / "data.py"), "--data_dir=out"], standin, tmp_path)
    finally:
        standin.stop()
    assert second.returncode == 0, second.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows_read"] == 50 and manifest["counts"] == {"val": 5, "train": 45}
    gets = [r for r in standin.requests(f"/api/v1/datasets/{DATASET}/repo")
            if r["query"].get("FilePath") == "r1_data_example.jsonl"]
    assert gets[0].get("stalled") and len(gets) == 2

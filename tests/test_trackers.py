"""REPORT_TO: real offline training runs whose tracker logs are read back, and never a login prompt."""
import json

import pytest

import train_lora
from tests.conftest import FAST_TRAINING


def train_with(tracker, tiny_model_dir, data_dir, out):
    settings = [s for s in FAST_TRAINING if not s.startswith(("--report_to", "--max_steps"))]
    train_lora.main([f"--model_path={tiny_model_dir}", f"--data_dir={data_dir}", f"--output_dir={out}", *settings,
                     "--max_steps=2", "--log_steps=1", f"--report_to={tracker}"])
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture
def no_swanlab_login(monkeypatch, tmp_path):
    for name in ("SWANLAB_API_KEY", "SWANLAB_MODE", "SWANLAB_LOG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "no-login"))
    monkeypatch.chdir(tmp_path)


def test_swanlab_offline_run_logs_the_training_loss(tiny_model_dir, short_data_dir, tmp_path, no_swanlab_login):
    from swanlab.proto.swanlab.record.v1 import record_pb2
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    out = tmp_path / "o"
    logged = train_with("swanlab", tiny_model_dir, short_data_dir, out)
    files = list((out / "swanlog").glob("run-*/run-*.swanlab"))
    assert len(files) == 1
    reader, tracked = DataStoreReader(), {}
    reader.open(files[0])
    while (data := reader.scan()) is not None:
        record = record_pb2.Record()
        record.ParseFromString(data)
        if record.HasField("scalar") and record.scalar.key == "train/loss":
            tracked[record.scalar.step] = record.scalar.value.number
    reader.close()
    assert tracked == pytest.approx(logged) and sorted(tracked) == [1, 2]


def test_tensorboard_run_writes_the_training_loss_under_output_dir(tiny_model_dir, short_data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    logged = train_with("tensorboard", tiny_model_dir, short_data_dir, out)
    event_files = list(out.glob("runs/*/events.out.tfevents.*"))
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    tracked = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tracked == pytest.approx(logged, rel=1e-6) and sorted(tracked) == [1, 2]


def test_report_to_never_prompts(tmp_path, no_swanlab_login, monkeypatch):
    import os

    from medsft.training import resolve_report_to

    assert resolve_report_to("none", tmp_path) == []
    assert resolve_report_to("auto", tmp_path) == []  # not logged in: no SwanLab at all
    assert resolve_report_to("tensorboard", tmp_path) == ["tensorboard"]
    assert resolve_report_to("swanlab", tmp_path) == ["swanlab"]
    assert os.environ["SWANLAB_MODE"] == "offline"  # forced without a key: offline, no login prompt
    assert os.environ["SWANLAB_LOG_DIR"] == str(tmp_path / "swanlog")
    monkeypatch.setenv("SWANLAB_API_KEY", "k")
    assert resolve_report_to("auto", tmp_path) == ["swanlab"]

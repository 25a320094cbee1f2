"""Spectral values reach real report_to backends, locally: TensorBoard, Trackio, and W&B in offline mode."""

import glob
import json
import sqlite3

import pytest

from trainer_ext import SpectralTrainer, SpectralTrainingArguments

from .test_callbacks import Data, TinyViT, _args

KEY = "spec/blocks.0.mlp.fc1/sigma_max"


@pytest.mark.slow
def test_values_reach_tensorboard_trackio_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.chdir(tmp_path)
    for backend in ("tensorboard", "trackio", "wandb"):  # after setenv: trackio reads TRACKIO_DIR when imported
        pytest.importorskip(backend)
    args = SpectralTrainingArguments(**_args(tmp_path / "out", max_steps=4, report_to=["tensorboard", "trackio", "wandb"],
                                             project="peft-ext-test", run_name="spectral"),
                                     spec_monitor=True, spec_every=2, spec_topk=2, spec_targets="mlp.fc1")
    trainer = SpectralTrainer(model=TinyViT(), args=args, train_dataset=Data())
    trainer.train()
    expected = {e["step"]: e[KEY] for e in trainer.state.log_history if KEY in e}
    assert sorted(expected) == [2, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = {e.step: e.value for e in acc.Scalars("train/" + KEY)}
    assert scalars == pytest.approx(expected, rel=1e-6)

    db = sqlite3.connect(glob.glob(str(tmp_path / "trackio" / "*.db"))[0])
    rows = [json.loads(m) for (m,) in db.execute("select metrics from metrics")]
    assert [r["train/" + KEY] for r in rows if "train/" + KEY in r] == pytest.approx([expected[2], expected[4]], rel=1e-6)

    import wandb

    wandb.finish()  # transformers leaves the run open; finishing flushes the offline run file
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and KEY.encode() in open(runs[0], "rb").read()

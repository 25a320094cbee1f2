"""Spectral values reach real report_to backends, locally: TensorBoard, Trackio, and W&B in offline mode, next to
the Trainer's own loss (a check that falls on a logging step must not cost the Trainer its log)."""

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
    args = SpectralTrainingArguments(**_args(tmp_path / "out", max_steps=4, logging_steps=2,
                                             report_to=["tensorboard", "trackio", "wandb"], project="peft-ext-test",
                                             run_name="spectral"),
                                     spec_monitor=True, spec_every=2, spec_topk=2, spec_targets="mlp.fc1")
    trainer = SpectralTrainer(model=TinyViT(), args=args, train_dataset=Data())
    try:
        trainer.train()
    finally:
        import wandb

        # Deterministic flush, no sleeping: transformers leaves the W&B run open; `finish` writes its exit record, but
        # the wandb-core service closes the offline run file only after `inform_finish`, which is sent without
        # waiting (measured here: 2 of 6 runs read an 8-byte file right after `finish`). `teardown` shuts the service
        # down and joins its process, so the file is complete when it returns (18 of 18 runs). TensorBoard's callback
        # flushes its writer after every log and closes it at train end; Trackio's `finish` (called by its callback at
        # train end) joins its local writer thread.
        wandb.finish()
        wandb.teardown()
    history = trainer.state.log_history
    expected = {e["step"]: e[KEY] for e in history if KEY in e}
    losses = {e["step"]: e["loss"] for e in history if "loss" in e}
    assert sorted(expected) == sorted(losses) == [2, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    for key, values in ((KEY, expected), ("loss", losses)):
        assert {e.step: e.value for e in acc.Scalars("train/" + key)} == pytest.approx(values, rel=1e-6)

    db = sqlite3.connect(glob.glob(str(tmp_path / "trackio" / "*.db"))[0])
    rows = [json.loads(m) for (m,) in db.execute("select metrics from metrics")]
    for key, values in ((KEY, expected), ("loss", losses)):
        assert [r["train/" + key] for r in rows if "train/" + key in r] == pytest.approx([values[2], values[4]], rel=1e-6)

    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    content = open(runs[0], "rb").read()
    assert ("train/" + KEY).encode() in content and b"train/loss" in content and b"train/grad_norm" in content

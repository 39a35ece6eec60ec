"""TensorBoard logs (train.tensorboard = true), read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json

import pytest

import vaekit

pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra: pip install 'vaekit[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def events(run) -> EventAccumulator:
    logs = EventAccumulator(str(run.path("tensorboard")))
    logs.Reload()
    return logs


def test_every_epochs_losses_kl_and_images_are_in_the_tensorboard_log(digits, tmp_path):
    """Each epoch's train and test loss (those of metrics.jsonl), learning rate, the KL of each latent dimension and
    the image grids are logged once per epoch, also across a resume from an older checkpoint, whose later epochs
    are logged anew rather than twice."""
    run = vaekit.train("digits", tmp_path / "run", epochs=4, dataset=digits, tensorboard=True, verbose=False)
    older = sorted(run.path("checkpoints").glob("step-*.safetensors"))[0]  # the end of epoch 3
    run = vaekit.resume(older, dataset=digits, verbose=False)
    logs = events(run)
    rows = [json.loads(line) for line in run.path("metrics").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for split in ("train", "test"):
        logged = logs.Scalars(f"loss/{split}")
        assert [e.step for e in logged] == [1, 2, 3, 4]
        assert [e.value for e in logged] == pytest.approx([r[f"{split}_loss"] for r in rows], rel=1e-6)
    assert [e.value for e in logs.Scalars("lr")] == pytest.approx([1e-3] * 4)
    tags = logs.Tags()
    assert sorted(t for t in tags["scalars"] if t.startswith("kl/")) == ["kl/000", "kl/001"]  # latent 2
    assert all(e.value >= 0 for e in logs.Scalars("kl/000"))
    assert set(tags["images"]) == {"reconstructions", "samples"}
    assert [e.step for e in logs.Images("samples")] == [1, 2, 3, 4]


def test_no_tensorboard_log_unless_asked(digits, tmp_path):
    run = vaekit.train("digits", tmp_path / "run", epochs=1, dataset=digits, verbose=False)
    assert not run.path("tensorboard").exists()

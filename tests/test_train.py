"""Training on real data: the loss falls, runs are reproducible, and saved models load back exactly."""

import json
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vaekit
from vaekit.cli import main


def test_training_on_digits_beats_bound_and_baseline(digits, tmp_path):
    """30 epochs on digits bring the test loss under 26 nats and under an independent-pixel model."""
    run = vaekit.train("digits", out=tmp_path / "run", dataset=digits, epochs=30, verbose=False)
    first, last = run.metrics[0]["test_loss"], run.metrics[-1]["test_loss"]
    train_x, test_x = digits.split("train").x, digits.split("test").x
    pixel_means = train_x.mean(0, keepdim=True).clamp(1e-4, 1 - 1e-4).expand_as(test_x)
    baseline = F.binary_cross_entropy(pixel_means, test_x, reduction="sum").item() / len(test_x)
    # Seeds 1-8 ended between 24.9 and 25.3 nats; the marginal baseline is about 27.0.
    assert last < 26.0
    assert last < baseline - 0.7
    assert last < first - 4


def test_a_run_records_its_data_and_reports_each_epoch_in_one_line(tmp_path, capsys):
    """data.json says where the data came from (the file's path), their shape and each split's size; each epoch is
    one line of its losses and seconds."""
    path = tmp_path / "table.npy"
    np.save(path, np.random.default_rng(0).random((50, 6)).astype(np.float32))
    run = vaekit.train("table", tmp_path / "run", epochs=2, data=str(path), verbose=True)
    record = json.loads((run.dir / "data.json").read_text())
    assert {k: record[k] for k in ("source", "name", "shape")} == {"source": "config", "name": str(path), "shape": [6]}
    assert {split: size for split, (size, _) in record["splits"].items()} == {"train": 40, "test": 10}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2
    for epoch, line in enumerate(lines, 1):
        assert re.fullmatch(
            rf"epoch {epoch:3d}  train loss +\d+\.\d{{4}}  test loss +\d+\.\d{{4}}  \(\d+\.\d\d s\)", line
        )


def test_run_directory_and_metrics(digits, tmp_path):
    """A run directory holds the resolved config, weights, description and one metrics line per epoch."""
    run = vaekit.train("digits", out=tmp_path / "run", dataset=digits, epochs=3, verbose=False)
    names = {p.name for p in run.dir.iterdir()}
    assert {"config.toml", "model.safetensors", "model.json", "metrics.jsonl"} <= names
    rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["seconds"] > 0 and r["train_loss"] > 0 and r["test_loss"] > 0 for r in rows)
    cfg = vaekit.load_config(run.dir)
    assert cfg.train.epochs == 3 and cfg.preset == "digits" and cfg.model.hidden == [256]
    assert not any(p.name.endswith(".tmp") or ".tmp." in p.name for p in run.dir.iterdir())


def test_save_load_reproduces_outputs_exactly(digits, tmp_path):
    """encode and decode of a loaded model equal the trained model's bit for bit."""
    run = vaekit.train("digits", out=tmp_path / "run", dataset=digits, epochs=2, latent=3, verbose=False)
    loaded = vaekit.load(run.dir)
    x = digits.split("test").x
    trained = run.model.cpu().eval()
    with torch.no_grad():
        for a, b in zip(trained.encode(x), loaded.encode(x), strict=True):
            assert torch.equal(a, b)
        z = torch.randn(50, 3)
        assert torch.equal(trained.decode(z), loaded.decode(z))


def test_same_seed_same_weights(digits, tmp_path):
    """Two runs with one seed give identical weights; another seed does not."""
    kw = dict(dataset=digits, epochs=2, verbose=False)
    a = vaekit.train("digits", out=tmp_path / "a", seed=5, **kw).model.state_dict()
    b = vaekit.train("digits", out=tmp_path / "b", seed=5, **kw).model.state_dict()
    c = vaekit.train("digits", out=tmp_path / "c", seed=6, **kw).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_dynamic_binarisation_trains(tmp_path):
    """With dynamic binarisation the model learns from 0/1 samples and its test loss falls."""
    run = vaekit.train("digits", out=tmp_path / "run", binarize=True, epochs=10, verbose=False)
    assert run.metrics[-1]["test_loss"] < run.metrics[0]["test_loss"]


def test_existing_run_is_not_overwritten(digits, tmp_path):
    """Training into a directory that already holds a run is refused."""
    vaekit.train("digits", out=tmp_path / "run", dataset=digits, epochs=1, verbose=False)
    with pytest.raises(vaekit.VaekitError, match="already holds a run"):
        vaekit.train("digits", out=tmp_path / "run", dataset=digits, epochs=1, verbose=False)


@pytest.mark.heavy
def test_seed_preset_on_mnist(mnist_root, tmp_path):
    """One epoch of the seed preset on real MNIST reaches the tutorial's first-epoch test loss range."""
    run = vaekit.train(
        "seed",
        out=tmp_path / "run",
        epochs=1,
        root=str(mnist_root),
        download=False,
        device="cpu",
        verbose=False,
    )
    assert run.model.shape == (1, 28, 28)
    # The tutorial's loop gives about 168 nats after one epoch at these sizes (benchmarks/seed_speed.py).
    assert 150 < run.metrics[0]["test_loss"] < 175


def test_run_finds_relative_data_from_elsewhere(tmp_path, monkeypatch):
    """A run trained on a relative .npy path records it absolutely, so encode works from another directory."""
    import numpy as np

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    np.save("x.npy", np.random.default_rng(0).random((50, 4, 4), dtype=np.float32))
    vaekit.train("digits", out="run", data="x.npy", epochs=1, verbose=False)
    monkeypatch.chdir(tmp_path / "b")
    mean, logvar, labels = vaekit.encode(tmp_path / "a" / "run")
    assert mean.shape == (10, 2) and labels is None


def test_outputs_get_the_permissions_the_umask_allows(digits, tmp_path):
    """Files written atomically are not left private to their owner: they follow the umask like any other file."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        run = vaekit.train("digits", tmp_path / "run", dataset=digits, epochs=1, hidden=[8], verbose=False)
    finally:
        os.umask(old)
    for name in ("config.toml", "model.json", "model.safetensors", "metrics.jsonl"):
        assert stat.S_IMODE((run.dir / name).stat().st_mode) == 0o644, name


@pytest.mark.parametrize(
    "args",
    ['train.optimizer_args={amsgrad="yes"}', "train.optimizer_args={differentiable=true}"],
    ids=["flag-of-the-wrong-type", "differentiable"],
)
def test_optimizer_arguments_that_fail_at_the_first_step_are_refused_before_the_run_exists(args, tmp_path, capsys):
    """Arguments the optimizer accepts but fails on when it steps: one line, exit 2, and no run directory, so that a
    retry with the same --out works."""
    code = main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--set", args, "--no-plots", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "optimizer" in err.lower(), err
    assert not (tmp_path / "run").exists()


def test_rprop_with_malformed_step_sizes_is_refused_before_the_run_exists(tmp_path, capsys):
    """Rprop's step_sizes must be two numbers; three fail only at its first step."""
    code = main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--set", "train.optimizer=Rprop",
                 "--set", "train.optimizer_args={step_sizes=[1e-6, 50, 3]}", "--no-plots", "-q"])  # fmt: skip
    assert code == 2 and "Rprop" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_folder_of_the_users_own_files_is_not_taken_as_a_run(tmp_path, capsys):
    """--out naming a folder that holds other files (but no run) is refused, and the files stay as they were."""
    folder = tmp_path / "mine"
    (folder / "plots").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"my own weights")
    (folder / "plots" / "loss.png").write_bytes(b"my own plot")
    code = main(["train", "--epochs", "1", "--out", str(folder), "--no-plots", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "not empty" in err, err
    assert (folder / "model.safetensors").read_bytes() == b"my own weights"
    assert (folder / "plots" / "loss.png").read_bytes() == b"my own plot"
    assert sorted(p.name for p in folder.rglob("*")) == ["loss.png", "model.safetensors", "plots"]


@pytest.mark.parametrize(
    ("data", "preset", "name", "expected"),
    [
        ("fashion-mnist", "mnist-like", "fashion-mnist", {"epochs": 20, "latent": 16, "net": "mlp"}),
        ("kmnist", "mnist-like", "kmnist", {"epochs": 20, "latent": 16, "net": "mlp"}),
        ("/data/my_images", "images", "my_images", {"epochs": 30, "latent": 16, "net": "conv"}),
        ("arrays.npz", "arrays", "arrays", {"epochs": 30, "latent": 16, "net": "mlp"}),
        ("sensors.csv", "table", "sensors", {"epochs": 50, "latent": 4, "likelihood": "gaussian"}),
        ("digits", "digits", "digits", {"epochs": 150, "latent": 2}),
    ],
)
def test_data_named_without_a_preset_choose_the_defaults_and_the_run_name(data, preset, name, expected):
    from vaekit.config import make_config, run_name

    cfg = make_config(overrides={"data.name": data})
    assert (cfg.preset, run_name(cfg), cfg.data.name) == (preset, name, data)
    found = {**vars(cfg.train), **vars(cfg.model)}
    assert {k: found[k] for k in expected} == expected
    chosen = make_config("seed", overrides={"data.name": data})  # an explicit preset wins, and names the run
    assert (chosen.train.epochs, chosen.model.latent, run_name(chosen)) == (10, 2, "seed")


def test_a_run_of_named_data_is_named_after_them_and_says_what_it_trains(tmp_path, monkeypatch, capsys):
    import numpy as np

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "strokes.npy", (np.random.default_rng(0).random((80, 1, 8, 8)) > 0.5).astype(np.float32))
    assert main(["train", "--data", "strokes.npy", "--epochs", "1", "--no-plots"]) == 0
    out = capsys.readouterr().out
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("strokes-")
    said = "data strokes.npy (1, 8, 8): 64 train, 16 test; model mlp [512], latent 16, bernoulli; 1 epoch of batch"
    assert said in out
    assert vaekit.open_run(run).config.preset == "arrays"


def test_binarize_feeds_fresh_binary_batches_to_the_objective(digits, tmp_path):
    """With data.binarize every batch the encoder sees in training is binary, a new Bernoulli draw of the grey images
    each time (its mean follows the grey levels), and without it the encoder sees the grey images themselves."""
    from vaekit.nets import MLPEncoder

    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for binarize in (True, False):

        def record(module, inputs, output, into=seen[binarize]):
            if isinstance(module, MLPEncoder) and module.training:
                into.append(inputs[0].detach().cpu())

        hook = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            vaekit.train("digits", tmp_path / str(binarize), epochs=2, binarize=binarize, dataset=digits,
                         checkpoint_every=0, verbose=False)  # fmt: skip
        finally:
            hook.remove()
    steps = 2 * ((len(digits.split("train").x) + 63) // 64)
    assert len(seen[True]) == len(seen[False]) == steps
    binary, grey = torch.cat(seen[True]), torch.cat(seen[False])
    assert ((binary == 0) | (binary == 1)).all()
    assert not ((grey == 0) | (grey == 1)).all()
    # Both runs draw the same data order, so position i of each holds the same image: the binary one is a Bernoulli
    # draw of the grey one, pixel by pixel (a threshold would make every pixel of one grey level alike).
    for level in grey.unique():
        ones = binary[grey == level].mean().item()
        assert abs(ones - level.item()) < 0.05, (level.item(), ones)
    # Each epoch draws anew: an image met in both epochs (found by its grey pixels) is binarised differently.
    half = len(grey) // 2
    second = {bytes(g.numpy()): i for i, g in enumerate(grey[half:])}
    matched = [(i, second[bytes(g.numpy())]) for i, g in enumerate(grey[:half]) if bytes(g.numpy()) in second]
    redrawn = sum(not torch.equal(binary[i], binary[half + j]) for i, j in matched)
    assert len(matched) > half * 0.9 and redrawn > 0.9 * len(matched)


def test_a_long_run_reports_about_fifteen_epochs_the_first_and_the_last(digits, tmp_path, capsys):
    """A run of 32 epochs prints every second epoch (32 // 15 = 2), the first and the last; a run of 5 prints each."""
    small = vaekit.Dataset("small", {s: digits.split(s).take(slice(0, 64)) for s in ("train", "test")})
    for epochs, expected in ((32, [1, *range(2, 33, 2)]), (5, [1, 2, 3, 4, 5])):
        capsys.readouterr()
        vaekit.train("digits", out=tmp_path / f"run{epochs}", dataset=small, epochs=epochs, batch_size=64, hidden=[8])
        printed = [int(m) for m in re.findall(r"^epoch +(\d+) ", capsys.readouterr().out, re.M)]
        assert printed == expected


def test_a_run_first_says_where_it_is_and_what_it_resumes_from(digits, tmp_path, capsys):
    """The first line a run prints is its directory; a resumed run adds the checkpoint it starts from."""
    run = vaekit.train("digits", tmp_path / "run", epochs=1, dataset=digits)
    assert capsys.readouterr().out.splitlines()[0] == f"run directory: {run.dir}"
    vaekit.resume(run.dir, epochs=2, dataset=digits)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"run directory: {run.dir} (resuming from step-0000000023.safetensors)"


def test_a_second_signal_stops_at_once_naming_the_run_to_resume(tmp_path):
    """The first SIGINT or SIGTERM is noted for the loop to act on after its step; a second one stops at once, with
    exit code 128 + the signal and the command that continues the run."""
    from vaekit.checkpoint import Progress
    from vaekit.training import Interrupted, _Signals

    with _Signals(tmp_path, Progress()) as signals:
        signal.raise_signal(signal.SIGTERM)
        assert signals.received == signal.SIGTERM
        # A single process acts on it after the step it came in, not only where several processes would agree.
        assert signals.poll(agree=False) == signal.SIGTERM
        with pytest.raises(Interrupted) as stopped:
            signal.raise_signal(signal.SIGTERM)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert str(stopped.value) == (
        f"SIGTERM: a second signal: stopped at once; continue with: vaekit train --resume {tmp_path}"
    )
    saved = tmp_path / "checkpoints" / "step-0000000030.safetensors"
    for progress, where in [
        (Progress(epoch=1, step=7), "in epoch 2 after step 7"),
        (Progress(epoch=3), "after epoch 3"),
    ]:
        assert str(Interrupted(signal.SIGINT, tmp_path, saved, progress)) == (
            f"SIGINT: training stopped {where} and saved {saved}; continue with: vaekit train --resume {tmp_path}"
        )


def test_a_run_resumed_mid_epoch_shows_its_bar_from_the_step_it_resumes_at(digits, tmp_path, monkeypatch):
    """On a terminal the epoch's bar of a run resumed at step 10 of 23 starts at 10/23, not at 0."""
    from conftest import Terminal

    run = vaekit.train("digits", tmp_path / "run", epochs=1, dataset=digits, verbose=False,
                       checkpoint_every=5, keep_checkpoints=10)  # fmt: skip
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    vaekit.resume(run.dir / "checkpoints" / "step-0000000010.safetensors", dataset=digits)
    assert re.search(r"(^|\r)epoch 1/1: +43%\|[^|]*\| 10/23 ", terminal.text), terminal.text[:300]


def test_out_naming_a_file_is_refused_saying_so(digits, tmp_path):
    """--out must name a directory: a file there is refused, and left as it was."""
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(vaekit.VaekitError) as refused:
        vaekit.train("digits", tmp_path / "notes", epochs=1, dataset=digits, verbose=False)
    assert str(refused.value) == f"--out {tmp_path / 'notes'} is a file, not a directory"
    assert (tmp_path / "notes").read_text() == "mine"


def test_train_defaults_to_the_digits_preset_and_applies_overrides_to_a_config(digits, tmp_path):
    """vaekit.train() with no configuration trains the digits preset; given a Config, its keyword overrides still
    apply."""
    run = vaekit.train(out=tmp_path / "default", epochs=1, dataset=digits, verbose=False)
    assert run.config.preset == "digits" and run.config.data.name == "digits"
    config = vaekit.make_config("digits")
    assert config.train.epochs != 2
    run = vaekit.train(config, tmp_path / "given", epochs=2, dataset=digits, verbose=False)
    assert run.config.train.epochs == 2 and len(run.metrics) == 2

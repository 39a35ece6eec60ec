"""Tests of the `vaekit` command: one real training run on digits used by every command, and bad inputs.

Starting `python -m vaekit` costs a few seconds (it imports torch), so independent commands run side by side,
and `COMMAND --help` and the table of bad inputs run through vaekit.cli.main in this process; a subset of the
table also runs as real processes to check what a user sees on stderr.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vaekit
from vaekit.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_NAMES = {"latent.png", "manifold.png", "samples.png", "reconstructions.png", "loss.png", "interpolations.png"}
N_TEST = 359  # digits holds 1797 examples; the default test_fraction of 0.2 holds out round(359.4) of them
COMMANDS = ["train", "evaluate", "sample", "reconstruct", "encode", "decode", "plot"]


def vaekit_run(args: list[str | Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m vaekit ARGS` in cwd and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "vaekit", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def vaekit_run_all(commands: dict[str, list[str | Path]], cwd: Path) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several independent `python -m vaekit` commands side by side; results by the same keys."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(vaekit_run, args, cwd) for key, args in commands.items()}
        return {key: f.result() for key, f in futures.items()}


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}:\n{result.stderr}"
    return result


# ---------------------------------------------------------------- one real run and every command on it


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train on digits for 2 epochs once; note what the run directory held right after training."""
    cwd = tmp_path_factory.mktemp("cli")
    result = vaekit_run(["train", "--epochs", "2", "--out", "RUN"], cwd)
    run = cwd / "RUN"
    plots = {p.name: p.read_bytes()[:8] for p in (run / "plots").iterdir()} if (run / "plots").is_dir() else {}
    return {"cwd": cwd, "run": run, "result": result, "plots_after_train": plots}


@pytest.fixture(scope="module")
def used(trained: dict) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every command on the trained run (decode after encode, since it reads encode's output)."""
    cwd = trained["cwd"]
    ok(trained["result"])
    results = vaekit_run_all(
        {
            "sample": ["sample", "RUN", "-n", "16", "-o", "s.png", "--npy", "s.npy"],
            "reconstruct": ["reconstruct", "RUN", "-n", "8", "-o", "r.png"],
            "encode-npy": ["encode", "RUN", "-o", "lat.npy"],
            "encode-npz": ["encode", "RUN", "-o", "lat.npz"],
            "plot": ["plot", "RUN"],
        },
        cwd,
    )
    results["decode"] = vaekit_run(["decode", "RUN", "lat.npy", "-o", "d.png", "--npy", "d.npy"], cwd)
    return results


def test_train_writes_a_complete_run_directory(trained):
    """`train --epochs 2 --out RUN` exits 0 and writes config, weights, description, 2 metric lines and 6 PNG plots."""
    ok(trained["result"])
    run = trained["run"]
    assert trained["result"].stdout.strip().splitlines()[-1] == "RUN"
    for name in ("config.toml", "model.safetensors", "model.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["train"]["epochs"] == 2
    assert config["data"]["name"] == "digits"
    description = json.loads((run / "model.json").read_text())
    assert description["shape"] == [1, 8, 8]
    assert description["model"]["latent"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    metrics = [json.loads(line) for line in lines]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(m) >= {"epoch", "train_loss", "test_loss", "seconds"}
        # a negative ELBO with a Bernoulli likelihood is a cross-entropy plus a KL: finite and positive
        assert np.isfinite(m["train_loss"]) and m["train_loss"] > 0
        assert np.isfinite(m["test_loss"]) and m["test_loss"] > 0
        assert m["seconds"] > 0
    assert set(trained["plots_after_train"]) == PLOT_NAMES
    for name, head in trained["plots_after_train"].items():
        assert head == PNG_SIGNATURE, name


def test_train_reloads_as_a_model(trained):
    """The run directory rebuilds through the API into a model for 1x8x8 images with 2 latent dimensions."""
    ok(trained["result"])
    model = vaekit.load(trained["run"])
    assert model.shape == (1, 8, 8)
    assert model.latent == 2
    assert vaekit.load_config(trained["run"]).train.epochs == 2


def test_sample_writes_png_and_npy(trained, used):
    """`sample -n 16` writes a PNG grid and a (16, 1, 8, 8) array in [0, 1], the same as the API's samples."""
    cwd = trained["cwd"]
    ok(used["sample"])
    assert is_png(cwd / "s.png")
    s = np.load(cwd / "s.npy")
    assert s.shape == (16, 1, 8, 8)
    assert s.min() >= 0 and s.max() <= 1
    np.testing.assert_allclose(s, vaekit.sample(trained["run"], 16, seed=0).numpy(), atol=1e-6)


def test_reconstruct_writes_png(trained, used):
    """`reconstruct -n 8 -o r.png` writes a PNG."""
    ok(used["reconstruct"])
    assert is_png(trained["cwd"] / "r.png")


def test_encode_writes_means_and_log_variances(trained, used):
    """`encode -o lat.npy` writes (359, 2, 2); `-o lat.npz` holds the same means and log-variances and the labels."""
    cwd = trained["cwd"]
    ok(used["encode-npy"])
    ok(used["encode-npz"])
    lat = np.load(cwd / "lat.npy")
    assert lat.shape == (N_TEST, 2, 2)
    assert np.isfinite(lat).all()
    with np.load(cwd / "lat.npz") as npz:
        assert set(npz.files) == {"mean", "logvar", "label"}
        np.testing.assert_array_equal(npz["mean"], lat[:, 0])
        np.testing.assert_array_equal(npz["logvar"], lat[:, 1])
        labels = npz["label"]
    test = vaekit.load_data(vaekit.DataConfig(name="digits")).split("test")
    np.testing.assert_array_equal(labels, test.y.numpy())
    model = vaekit.load(trained["run"])
    with torch.no_grad():
        mean, logvar = model.encode(test.x)
    np.testing.assert_allclose(lat[:, 0], mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(lat[:, 1], logvar.numpy(), atol=1e-5)


def test_decode_reads_encode_output(trained, used):
    """`decode RUN lat.npy` decodes the 359 means into a PNG and a (359, 1, 8, 8) array in [0, 1]."""
    cwd = trained["cwd"]
    ok(used["encode-npy"])
    ok(used["decode"])
    assert is_png(cwd / "d.png")
    d = np.load(cwd / "d.npy")
    assert d.shape == (N_TEST, 1, 8, 8)
    assert d.min() >= 0 and d.max() <= 1
    model = vaekit.load(trained["run"])
    with torch.no_grad():
        expected = model.decode(torch.from_numpy(np.load(cwd / "lat.npy")[:, 0]))
    np.testing.assert_allclose(d, expected.numpy(), atol=1e-6)


def test_plot_prints_six_png_paths(trained, used):
    """`plot RUN` prints six paths, one per plot, each a PNG inside RUN/plots."""
    result = ok(used["plot"])
    paths = [trained["cwd"] / line for line in result.stdout.splitlines() if line.strip()]
    assert len(paths) == 6
    assert {p.name for p in paths} == PLOT_NAMES
    for p in paths:
        assert p.parent.resolve() == (trained["run"] / "plots").resolve()
        assert is_png(p), p


def test_help_of_the_command(tmp_path):
    """`python -m vaekit --help` exits 0 and lists every command."""
    result = ok(vaekit_run(["--help"], tmp_path))
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_command(command, capsys):
    """`vaekit COMMAND --help` exits 0 and names the command in its usage."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code in (0, None)
    assert f"vaekit {command}" in capsys.readouterr().out


# ---------------------------------------------------------------- bad inputs


class Built(NamedTuple):
    """A bad-input case, built: its argv, the output files it names, the train --out folder (or None), and text
    that its error line must contain. Besides, no file may change anywhere in the test's folder or the shared run."""

    argv: list[str]
    outputs: list[Path]
    out: Path | None
    says: tuple[str, ...] = ()


# Each builder gets (tmp_path, run) and returns a Built case.
Case = Callable[[Path, Path], Built]


def _says(case: Case, *texts: str) -> Case:
    """The case, with texts that its error line must contain (the bad key, what is allowed)."""

    def build(tmp: Path, run: Path) -> Built:
        return case(tmp, run)._replace(says=texts)

    return build


def _train(*extra: str | Path, epochs: bool = True) -> Case:
    def build(tmp: Path, run: Path) -> Built:
        out = tmp / "out"
        argv = ["train", *(["--epochs", "1"] if epochs else []), "--no-plots", "--out", str(out), *map(str, extra)]
        return Built(argv, [], out)

    return build


def _train_with(make: Callable[[Path], list[str]]) -> Case:
    def build(tmp: Path, run: Path) -> Built:
        argv, outputs, out, _ = _train()(tmp, run)
        return Built([*argv, *make(tmp)], outputs, out)

    return build


def _npy(array: np.ndarray | None, name: str = "data.npy") -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        path = tmp / name
        if array is None:
            path.write_bytes(b"")
        else:
            np.save(path, array)
        return ["--data", str(path)]

    return make


def _npz(**arrays: np.ndarray) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        np.savez(tmp / "data.npz", **arrays)
        return ["--data", str(tmp / "data.npz")]

    return make


def _touch(path: str) -> None:
    Path(path).touch()


class _Unpickled:
    """An object whose unpickling creates a file beside the test's inputs: the evidence that it was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _touch, (str(self.marker),)


def _pickled_npy(tmp: Path) -> list[str]:
    """A .npy of Python objects (stored as a pickle), which must be refused without being unpickled."""
    np.save(tmp / "objects.npy", np.array([_Unpickled(tmp / "unpickled")] * 20, dtype=object))
    return ["--data", str(tmp / "objects.npy")]


def _file(name: str, text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / name).write_text(text)
        return ["--config", str(tmp / name)]

    return make


def _config(text: str) -> Case:
    """train --config FILE holding text."""
    return _train_with(_file("c.toml", text))


def _images(n: int, bad: Callable[[bytes], bytes] | None = None) -> Callable[[Path], list[str]]:
    """A folder of n valid 32x32 PNGs and, with bad, one more file bad.png made by bad(a valid PNG's bytes)."""

    def make(tmp: Path) -> list[str]:
        from PIL import Image

        folder = tmp / "images"
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image")
        rng = np.random.default_rng(0)
        png = tmp / "valid.png"
        Image.fromarray(rng.integers(0, 256, (32, 32), np.uint8)).save(png)
        for i in range(n):
            shutil.copy(png, folder / f"{i}.png")
        if bad is not None:
            (folder / "bad.png").write_bytes(bad(png.read_bytes()))
        return ["--data", str(folder), "--image-size", "8"]

    return make


def _conv(shape: tuple[int, ...], *settings: str) -> Callable[[Path], list[str]]:
    """--data of zeros of this shape with the conv net and further --set settings."""

    def make(tmp: Path) -> list[str]:
        sets = [arg for setting in ["model.net=conv", *settings] for arg in ("--set", setting)]
        return [*_npy(np.zeros(shape))(tmp), *sets]

    return make


def _random_bytes(data: bytes) -> bytes:
    return np.random.default_rng(1).integers(0, 256, len(data), np.uint8).tobytes()


def _nan_images() -> np.ndarray:
    a = np.full((20, 4, 4), 0.5)
    a[5, 1, 1] = np.nan
    return a


def _inf_images() -> np.ndarray:
    a = np.full((20, 4, 4), 0.5)
    a[7, 2, 3] = np.inf
    return a


def _empty_data_dir(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return ["--data", "mnist", "--no-download", "--data-dir", str(tmp / "empty")]


def _cuda(tmp: Path) -> list[str]:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available, so --device cuda is valid here")
    return ["--device", "cuda"]


def _damaged_run(damage: Callable[[Path], None]) -> Callable[[Path, Path], Path]:
    """A copy of the trained run, damaged by damage(copy)."""

    def make(tmp: Path, run: Path) -> Path:
        copy = tmp / "damaged"
        shutil.copytree(run, copy)
        damage(copy)
        return copy

    return make


def _existing_run(tmp: Path, run: Path) -> Path:
    return run


_copied_run = _damaged_run(lambda r: None)


def _missing_run(tmp: Path, run: Path) -> Path:
    return tmp / "no-such-run"


def _not_a_run(tmp: Path, run: Path) -> Path:
    (tmp / "plain").mkdir()
    (tmp / "plain" / "notes.txt").write_text("not a run")
    return tmp / "plain"


def _truncate_weights(run: Path) -> None:
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage_weights(run: Path) -> None:
    (run / "model.safetensors").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())


def _foreign_weights(run: Path) -> None:
    save_file({"w": torch.zeros(3)}, str(run / "model.safetensors"))


def _other_latent(run: Path) -> None:
    description = json.loads((run / "model.json").read_text())
    description["model"]["latent"] = 3
    (run / "model.json").write_text(json.dumps(description))


def _negative_latent(run: Path) -> None:
    description = json.loads((run / "model.json").read_text())
    description["model"]["latent"] = -1
    (run / "model.json").write_text(json.dumps(description))


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    """A damage: replace the run's file called name with data."""
    return lambda run: (run / name).write_bytes(data)


def _pickled_checkpoint(tmp: Path, run: Path) -> Path:
    """A pickle (of a harmless dict) posing as a checkpoint file in a copy of the run."""
    path = _copied_run(tmp, run) / "checkpoints" / "step-0000000001.safetensors"
    path.write_bytes(pickle.dumps({"epoch": 1, "weights": [0.0, 1.0]}))
    return path


def _only_pickled_checkpoint(run: Path) -> None:
    """The run's checkpoints replaced by one pickle (of a harmless dict), which --resume RUN then picks."""
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-0000000001.safetensors").write_bytes(pickle.dumps({"epoch": 1}))


def _foreign_checkpoint(run: Path) -> None:
    """A valid safetensors file without vaekit's metadata as the newest checkpoint."""
    save_file({"w": torch.zeros(3)}, str(run / "checkpoints" / "step-0000009999.safetensors"))


def _truncate_checkpoint(run: Path) -> None:
    """The newest checkpoint cut in half."""
    newest = sorted((run / "checkpoints").iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])


def _sample(where: Callable[[Path, Path], Path], *extra: str) -> Case:
    def build(tmp: Path, run: Path) -> Built:
        png, npy = tmp / "s.png", tmp / "s.npy"
        return Built(["sample", str(where(tmp, run)), "-o", str(png), "--npy", str(npy), *extra], [png, npy], None)

    return build


def _reconstruct(*extra: str, n: str = "4", where: Callable[[Path, Path], Path] = _existing_run) -> Case:
    def build(tmp: Path, run: Path) -> Built:
        png = tmp / "r.png"
        return Built(["reconstruct", str(where(tmp, run)), "-n", n, "-o", str(png), *extra], [png], None)

    return build


def _encode(where: Callable[[Path, Path], Path], *extra: str) -> Case:
    def build(tmp: Path, run: Path) -> Built:
        npy = tmp / "z.npy"
        return Built(["encode", str(where(tmp, run)), "-o", str(npy), *extra], [npy], None)

    return build


def _evaluate(where: Callable[[Path, Path], Path], *extra: str, k: str = "2") -> Case:
    """evaluate with few importance samples (quick, should the input be taken) and its summary saved in the run."""

    def build(tmp: Path, run: Path) -> Built:
        path = where(tmp, run)
        outputs = [path / "evaluation.json", path / "evaluation.npz"]
        return Built(["evaluate", str(path), "--k", k, *extra], outputs, None)

    return build


def _decode(latents: np.ndarray | bytes | None) -> Case:
    """decode of a latents .npy holding the array, or the raw bytes; None: no such file."""

    def build(tmp: Path, run: Path) -> Built:
        path, png, npy = tmp / "z.npy", tmp / "d.png", tmp / "d.npy"
        if isinstance(latents, bytes):
            path.write_bytes(latents)
        elif latents is not None:
            np.save(path, latents)
        return Built(["decode", str(run), str(path), "-o", str(png), "--npy", str(npy)], [png, npy], None)

    return build


def _resume(where: Callable[[Path, Path], Path], *extra: str) -> Case:
    """train --resume of what where gives (a copy of the run, changed or not, unless it is missing)."""

    def build(tmp: Path, run: Path) -> Built:
        return Built(["train", "--resume", str(where(tmp, run)), "--no-plots", *extra], [], None)

    return build


def _train_out_is_a_file(tmp: Path, run: Path) -> Built:
    (tmp / "afile").write_text("keep me")
    return Built(["train", "--epochs", "1", "--no-plots", "--out", str(tmp / "afile")], [], None)


def _sample_out_is_a_folder(tmp: Path, run: Path) -> Built:
    (tmp / "afolder").mkdir()
    npy = tmp / "s.npy"
    return Built(["sample", str(run), "-n", "4", "-o", str(tmp / "afolder"), "--npy", str(npy)], [npy], None)


def _sample_npy_is_a_folder(tmp: Path, run: Path) -> Built:
    (tmp / "adir").mkdir()
    png = tmp / "s.png"
    return Built(["sample", str(run), "-n", "4", "-o", str(png), "--npy", str(tmp / "adir")], [png], None)


def _with(a: np.ndarray, value: float) -> np.ndarray:
    a = a.copy()
    a[1, 0] = value
    return a


BAD_INPUTS = [
    # options and commands
    pytest.param(_train("--preset", "nope"), id="unknown-preset"),
    pytest.param(_train("--bogus"), id="unknown-option"),
    pytest.param(_train("--epochs", "many"), id="epochs-not-an-integer"),
    pytest.param(_train("--hidden", "64,x"), id="hidden-not-integers"),
    pytest.param(lambda tmp, run: Built(["nope"], [], None), id="unknown-command"),
    pytest.param(_train("--activation", "nope"), id="unknown-activation"),
    pytest.param(_train("--lr", "inf"), id="lr-infinite"),
    pytest.param(_train_with(_cuda), id="device-cuda-unavailable"),
    pytest.param(_train("--device", "nonsense"), id="device-unknown"),
    # data: missing and empty files, wrong shapes and dtypes, NaN/Inf values, pickles
    pytest.param(_train("--data", "no-such-data"), id="unknown-data-name"),
    pytest.param(_train_with(lambda tmp: ["--data", str(tmp / "missing.npy")]), id="missing-npy"),
    pytest.param(_train_with(_npy(None)), id="npy-empty-file"),
    pytest.param(_train_with(_npy(None, "data.npz")), id="npz-empty-file"),
    pytest.param(_train_with(_npy(np.zeros((1, 4, 4)))), id="npy-one-example"),
    pytest.param(_train_with(_npy(np.zeros((4, 1, 2, 3, 3)))), id="npy-5d"),
    pytest.param(_train_with(_npy(np.linspace(0, 1, 20))), id="npy-1d"),
    pytest.param(_train_with(_npy(np.full((20, 4, 4), "abc"))), id="npy-strings"),
    pytest.param(_train_with(_pickled_npy), id="npy-objects-not-unpickled"),
    pytest.param(_train_with(_npy(_nan_images())), id="npy-with-nan"),
    pytest.param(_train_with(_npy(_inf_images())), id="npy-with-inf"),
    pytest.param(_train_with(_npy(np.full((20, 4, 4), 2.0))), id="npy-above-one"),
    pytest.param(_train_with(_npz(images=np.zeros((20, 4, 4)), labels=np.zeros(20, int))), id="npz-without-x"),
    pytest.param(_train_with(_npz(x=np.zeros((20, 4, 4)), y=np.zeros(19, int))), id="npz-labels-wrong-length"),
    pytest.param(_train_with(_empty_data_dir), id="mnist-no-download-empty-dir"),
    # image folders
    pytest.param(_train_with(_images(0)), id="images-none-in-folder"),
    pytest.param(_train_with(_images(4, _random_bytes)), id="images-one-random-bytes-png"),
    pytest.param(_train_with(_images(4, lambda png: png[: len(png) // 2])), id="images-one-truncated-png"),
    pytest.param(_train_with(_images(4, lambda png: b"")), id="images-one-empty-png"),
    # configuration: --set and TOML files with unknown keys, invalid values and wrong types
    # without --epochs 1, which would override the --set
    pytest.param(_train("--set", "train.epochs=0", epochs=False), id="set-epochs-zero"),
    pytest.param(_train("--set", "model.nope=1"), id="set-unknown-key"),
    pytest.param(_train("--set", "train.lr=abc"), id="set-lr-wrong-type"),
    pytest.param(_train("--set", "nodot"), id="set-malformed"),
    pytest.param(_train("--set", "model.net=transformer"), id="set-unknown-net"),
    pytest.param(_config("[train]\nnope = 1\n"), id="config-unknown-key"),
    pytest.param(_config("[train\nepochs = = 3\n"), id="config-not-toml"),
    pytest.param(_train_with(lambda tmp: ["--config", str(tmp / "missing.toml")]), id="config-missing"),
    pytest.param(_config("train = 5\n"), id="config-section-not-a-table"),
    pytest.param(
        _says(_config("[model]\nlatent = -1\n"), "'model.latent'", "integer from 1 to 2**24"),
        id="config-latent-negative",
    ),
    pytest.param(
        _says(_config('[train]\noptimizer = "Nope"\n'), "train.optimizer", "'Nope'", "Adam, "), id="config-optimizer"
    ),
    pytest.param(
        _says(_config("[data]\ntest_fraction = 1.5\n"), "'data.test_fraction'", "between 0 and 1"),
        id="config-test-fraction-above-one",
    ),
    pytest.param(
        _says(_config("[train]\npatience = -1\n"), "'train.patience'", "integer >= 0"), id="config-patience-negative"
    ),
    pytest.param(
        _says(_config("[train]\nkeep_checkpoints = 0\n"), "'train.keep_checkpoints'", "integer >= 1"),
        id="config-keep-checkpoints-zero",
    ),
    pytest.param(_config("[train]\nskip_limit = 0\n"), id="config-skip-limit-zero"),
    pytest.param(_config("[train]\ncheckpoint_every = -1\n"), id="config-checkpoint-every-negative"),
    pytest.param(_says(_config("[train]\npatience = 3\n"), "data.validation"), id="config-patience-without-valid"),
    pytest.param(_says(_config('[model]\nhidden = "wide"\n'), "'model.hidden'", "list"), id="config-hidden-a-string"),
    pytest.param(_says(_config("[model]\nlatent = 2.5\n"), "'model.latent'", "int"), id="config-latent-a-float"),
    pytest.param(_config("[model]\nlatent = true\n"), id="config-latent-a-boolean"),
    pytest.param(_config('[train]\nscheduler = "nope"\n'), id="config-unknown-scheduler"),
    pytest.param(_config("[train]\noptimizer_args = {nope = 1}\n"), id="config-bad-optimizer-args"),
    # impossible sizes
    pytest.param(_says(_train("--image-size", "0"), "'data.image_size'"), id="image-size-zero"),
    pytest.param(_train("--image-size", "5000"), id="image-size-too-large"),
    pytest.param(_says(_train("--batch-size", "0"), "'train.batch_size'"), id="batch-size-zero"),
    pytest.param(_says(_train("--latent", "0"), "'model.latent'"), id="latent-zero"),
    pytest.param(_says(_train("--hidden", "0"), "'model.hidden'"), id="hidden-zero"),
    pytest.param(_train("--k", "0"), id="train-k-zero"),
    pytest.param(_train("--set", "model.channels=[]"), id="conv-channels-empty"),
    pytest.param(_train("--set", "data.validation=100000"), id="validation-larger-than-data"),
    # 4x4 images pass 2 stride-2 convolutions (4, 2, 1) but not 3; 2x2 images not even the default 2
    pytest.param(_train_with(_conv((20, 1, 4, 4), "model.channels=[8, 8, 8]")), id="conv-images-4x4-too-small"),
    pytest.param(_train_with(_conv((20, 1, 2, 2))), id="conv-images-2x2-too-small"),
    pytest.param(_train_with(_conv((20, 6))), id="conv-on-vectors"),
    # sizes past what can be allocated or indexed
    pytest.param(_train("--latent", "1000000000000000"), id="latent-too-large-to-allocate"),
    pytest.param(_sample(_existing_run, "-n", "100000000000000000"), id="sample-n-too-large-to-allocate"),
    pytest.param(_train("--hidden", "4611686018427387904"), id="hidden-overflows-int64"),
    pytest.param(_sample(_existing_run, "-n", "4611686018427387904"), id="sample-n-overflows"),
    pytest.param(_train("--latent", "99999999999999999999999"), id="latent-beyond-int64"),
    # run directories: missing, foreign, truncated and empty model files
    pytest.param(_sample(_missing_run), id="sample-missing-run"),
    pytest.param(_sample(_not_a_run), id="sample-not-a-run"),
    pytest.param(_sample(_damaged_run(_truncate_weights)), id="weights-truncated"),
    pytest.param(_sample(_damaged_run(_garbage_weights)), id="weights-garbage"),
    pytest.param(_sample(_damaged_run(_write("model.safetensors", b""))), id="weights-empty"),
    pytest.param(_sample(_damaged_run(_foreign_weights)), id="weights-foreign-safetensors"),
    pytest.param(_sample(_damaged_run(lambda r: (r / "model.safetensors").unlink())), id="weights-missing"),
    pytest.param(_sample(_damaged_run(_other_latent)), id="description-other-latent"),
    pytest.param(_sample(_damaged_run(_negative_latent)), id="description-latent-negative"),
    pytest.param(_sample(_damaged_run(lambda r: (r / "model.json").write_text("{"))), id="description-not-json"),
    pytest.param(_sample(_damaged_run(_write("model.json", b""))), id="description-empty"),
    pytest.param(_sample(_damaged_run(_write("model.json", b'{"a": 1}'))), id="description-foreign-json"),
    pytest.param(
        _reconstruct(where=_damaged_run(_write("config.toml", b""))),
        id="reconstruct-config-empty",
    ),
    pytest.param(_encode(_damaged_run(_write("config.toml", b""))), id="encode-config-empty"),
    pytest.param(_encode(_damaged_run(_write("config.toml", b"[data\n"))), id="encode-config-not-toml"),
    pytest.param(_encode(_damaged_run(lambda r: (r / "config.toml").unlink())), id="encode-config-missing"),
    # sample, reconstruct, encode, decode
    pytest.param(_sample(_existing_run, "-n", "0"), id="sample-n-zero"),
    pytest.param(_sample(_existing_run, "--seed", "-1"), id="sample-seed-negative"),
    pytest.param(_reconstruct("--split", "nope"), id="reconstruct-unknown-split"),
    pytest.param(_reconstruct(n="0"), id="reconstruct-n-zero"),
    pytest.param(_reconstruct(n="-1"), id="reconstruct-n-negative"),
    pytest.param(_encode(_existing_run, "--split", "nope"), id="encode-unknown-split"),
    pytest.param(_decode(np.zeros((5, 3), np.float32)), id="decode-wrong-width"),
    pytest.param(_decode(np.zeros(2, np.float32)), id="decode-1d"),
    pytest.param(_decode(_with(np.zeros((5, 2), np.float32), np.nan)), id="decode-nan"),
    pytest.param(_decode(_with(np.zeros((5, 2), np.float32), np.inf)), id="decode-inf"),
    pytest.param(_decode(None), id="decode-missing-latents"),
    pytest.param(_decode(b""), id="decode-latents-empty-file"),
    pytest.param(_decode(np.zeros((0, 2), np.float32)), id="decode-no-latents"),
    pytest.param(_decode(np.full((5, 2), "abc")), id="decode-latents-strings"),
    pytest.param(_decode(np.array([[0.5, {"a": 1}]], dtype=object)), id="decode-latents-objects"),
    # evaluate
    pytest.param(_evaluate(_existing_run, k="0"), id="evaluate-k-zero"),
    pytest.param(_evaluate(_existing_run, k="20000000"), id="evaluate-k-too-large"),
    pytest.param(_says(_evaluate(_existing_run, "--split", "nope"), "'nope'", "train, test"), id="evaluate-split"),
    pytest.param(_evaluate(_existing_run, "--max-elements", "0"), id="evaluate-max-elements-zero"),
    pytest.param(_evaluate(_existing_run, "--seed", "-1"), id="evaluate-seed-negative"),
    pytest.param(_evaluate(_existing_run, "--device", "nonsense"), id="evaluate-device-unknown"),
    pytest.param(_evaluate(_missing_run), id="evaluate-missing-run"),
    pytest.param(_evaluate(_damaged_run(_truncate_weights)), id="evaluate-weights-truncated"),
    pytest.param(_evaluate(_damaged_run(_foreign_weights)), id="evaluate-weights-foreign"),
    pytest.param(_evaluate(_damaged_run(_write("config.toml", b""))), id="evaluate-config-empty"),
    # train --resume: the run's files must stay byte-identical
    pytest.param(_resume(_missing_run), id="resume-missing"),
    pytest.param(_resume(_not_a_run), id="resume-not-a-run"),
    pytest.param(_says(_resume(_copied_run, "--lr", "0.1"), "train.lr", "--epochs"), id="resume-with-lr"),
    pytest.param(_resume(_copied_run, "--set", "model.latent=3"), id="resume-with-set"),
    pytest.param(_resume(_copied_run, "--out", "elsewhere"), id="resume-with-out"),
    pytest.param(_resume(_copied_run, "--epochs", "0"), id="resume-epochs-zero"),
    pytest.param(_says(_resume(_copied_run), "finished its 2 epochs"), id="resume-finished-run"),
    pytest.param(_resume(_copied_run, "--epochs", "1"), id="resume-finished-run-fewer-epochs"),
    pytest.param(_resume(_pickled_checkpoint), id="resume-pickle-as-checkpoint-file"),
    pytest.param(_resume(_damaged_run(_only_pickled_checkpoint)), id="resume-pickle-as-newest-checkpoint"),
    pytest.param(_resume(_damaged_run(_foreign_checkpoint)), id="resume-foreign-safetensors-checkpoint"),
    pytest.param(_resume(_damaged_run(_truncate_checkpoint)), id="resume-truncated-checkpoint"),
    # with --epochs 3, so that the bug costs one epoch of training rather than eight (the default is 10)
    pytest.param(
        _resume(_damaged_run(_write("config.toml", b"")), "--epochs", "3"),
        id="resume-config-empty",
    ),
    pytest.param(_resume(lambda tmp, run: _copied_run(tmp, run) / "model.safetensors"), id="resume-not-a-checkpoint"),
    # outputs that cannot be written
    pytest.param(_train_out_is_a_file, id="train-out-is-a-file"),
    pytest.param(_sample_out_is_a_folder, id="sample-out-is-a-folder"),
    pytest.param(_sample_npy_is_a_folder, id="sample-npy-is-a-folder-png-not-written"),
]

# Bad inputs also run as real `python -m vaekit` processes, one of each kind of failure.
REAL_PROCESS_IDS = ["unknown-option", "npy-with-nan", "weights-garbage", "resume-pickle-as-checkpoint-file"]


def _files(*folders: Path) -> dict[Path, bytes | None]:
    """Every file (with its bytes) and folder (None) in folders."""
    return {p: p.read_bytes() if p.is_file() else None for f in folders for p in [f, *f.rglob("*")]}


def _check_failure(code: int | str | None, stderr: str, built: Built, before: dict, after: dict) -> None:
    lines = stderr.splitlines()
    assert code == 2, f"exit code {code}, stderr:\n{stderr}"
    assert "Traceback" not in stderr
    assert len(lines) == 1, f"stderr is not one line:\n{stderr}"
    assert lines[0].startswith("vaekit") and "error" in lines[0], lines[0]
    for text in built.says:
        assert text in lines[0], f"{text!r} not in the error line: {lines[0]}"
    for path in built.outputs:
        assert not path.exists(), f"{path} was written"
    if built.out is not None:
        assert not (built.out / "config.toml").exists()
        assert not (built.out / "model.json").exists()
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    assert not (added or removed or changed), f"files added {added}, removed {removed}, changed {changed}"


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_with_one_line_and_exit_code_2(case, trained, tmp_path, monkeypatch, capsys):
    """A bad input exits with code 2 and one error line on stderr, writing or changing no file."""
    ok(trained["result"])
    built = case(tmp_path, trained["run"])
    before = _files(tmp_path, trained["run"])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    try:
        code = main(built.argv)
    except SystemExit as e:  # argparse exits rather than returning
        code = e.code
    _check_failure(code, capsys.readouterr().err, built, before, _files(tmp_path, trained["run"]))


@pytest.mark.heavy
def test_bad_inputs_in_real_processes(trained, tmp_path):
    """In real `python -m vaekit` processes, bad inputs exit 2 with one stderr line and no traceback."""
    ok(trained["result"])
    cases = {p.id: p.values[0] for p in BAD_INPUTS if p.id in REAL_PROCESS_IDS}
    assert set(cases) == set(REAL_PROCESS_IDS)
    built = {}
    for name, case in cases.items():
        (tmp_path / name).mkdir()
        built[name] = case(tmp_path / name, trained["run"])
    before = _files(tmp_path, trained["run"])
    results = vaekit_run_all({name: b.argv for name, b in built.items()}, tmp_path)
    after = _files(tmp_path, trained["run"])
    for name, b in built.items():
        result = results[name]
        try:
            _check_failure(result.returncode, result.stderr, b, before, after)
        except AssertionError as e:
            raise AssertionError(f"case {name}: {e}") from None


def test_train_refuses_to_overwrite_a_run(trained, tmp_path, monkeypatch, capsys):
    """`train --out` an existing run exits 2 and leaves that run's weights untouched."""
    ok(trained["result"])
    copy = tmp_path / "copy"
    shutil.copytree(trained["run"], copy)
    weights = (copy / "model.safetensors").read_bytes()
    metrics = (copy / "metrics.jsonl").read_text()
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--epochs", "1", "--no-plots", "--out", str(copy)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(copy) in err
    assert (copy / "model.safetensors").read_bytes() == weights
    assert (copy / "metrics.jsonl").read_text() == metrics


@pytest.mark.heavy
def test_tabular_data_through_every_command(tmp_path):
    """A model of (N, D) vectors trains, samples and decodes to .npy, plots what applies, and refuses pictures."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "table.npy", rng.random((120, 6), dtype=np.float32))
    ok(vaekit_run(["train", "--data", "table.npy", "--epochs", "2", "--out", "RUN"], tmp_path))
    assert {p.name for p in (tmp_path / "RUN" / "plots").iterdir()} == {"loss.png", "latent.png"}
    results = vaekit_run_all(
        {
            "sample": ["sample", "RUN", "-n", "5", "--npy", "s.npy"],
            "encode": ["encode", "RUN", "-o", "z.npy"],
            "sample-png": ["sample", "RUN", "-n", "5"],
            "reconstruct": ["reconstruct", "RUN", "-n", "4"],
        },
        tmp_path,
    )
    ok(results["sample"])
    ok(results["encode"])
    assert np.load(tmp_path / "s.npy").shape == (5, 6)
    assert np.load(tmp_path / "z.npy").shape == (24, 2, 16)  # the arrays preset's latent size
    assert not (tmp_path / "RUN" / "samples.png").exists()
    for name in ("sample-png", "reconstruct"):
        assert results[name].returncode == 2
        assert "not grey or RGB images" in results[name].stderr and "Traceback" not in results[name].stderr
    ok(vaekit_run(["decode", "RUN", "z.npy", "--npy", "d.npy"], tmp_path))
    assert np.load(tmp_path / "d.npy").shape == (24, 6)


@pytest.mark.heavy
def test_data_changed_since_training_is_refused(tmp_path):
    """When a run's data file now holds examples of another shape, encode and plot exit 2 instead of crashing."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", rng.random((40, 4, 4), dtype=np.float32))
    ok(vaekit_run(["train", "--data", "x.npy", "--epochs", "1", "--no-plots", "--out", "RUN"], tmp_path))
    np.save(tmp_path / "x.npy", rng.random((40, 5, 5), dtype=np.float32))
    results = vaekit_run_all({"encode": ["encode", "RUN", "-o", "z.npy"], "plot": ["plot", "RUN"]}, tmp_path)
    for result in results.values():
        assert result.returncode == 2
        assert len(result.stderr.splitlines()) == 1 and "trained on (1, 4, 4)" in result.stderr
    assert not (tmp_path / "z.npy").exists()


def test_an_error_is_quoted_by_its_first_line_or_its_type_when_it_says_nothing():
    """Messages quoted from other libraries keep their first line; an exception with no message is named by its type."""
    from vaekit.errors import first_line

    assert first_line(ValueError("  bad shape\n  signatures: ...  ")) == "bad shape"
    assert first_line(MemoryError()) == "MemoryError"
    assert first_line(RuntimeError(" \n ")) == "RuntimeError"

"""The fault-injection suite: classes of failure tried systematically, not case by case.

- Signals: every command, as a real `python -m vaekit` process, gets SIGINT or SIGTERM at a seeded random moment from
  start-up to its last write.
- Corrupted inputs: every data file format, every run file and the compressed files, emptied, replaced by a
  directory or another format's header, truncated and with a byte flipped at seeded offsets, under every command
  that reads them.

The commands work on one small trained model (binarised digits) and on inputs the tests generate. VAEKIT_SLOW=1
multiplies the trials: over 1,000 signals and over 1,000 corrupted files.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import write_fake_mnist
from PIL import Image

from vaekit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SLOW = bool(os.environ.get("VAEKIT_SLOW"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PLOTS = ["interpolations.png", "latent.png", "loss.png", "manifold.png", "reconstructions.png", "samples.png"]


def cli(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the vaekit command in this process: its exit code and stderr."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def temporary_files(folder: Path) -> list[Path]:
    """The temporary files and folders that vaekit's atomic writers leave only when something went wrong."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """The size and modification time of every file under folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def binary_digits(n: int) -> np.ndarray:
    """The first n digits of the bundled set, binarised: (n, 1, 8, 8) float32 of 0 and 1."""
    from sklearn.datasets import load_digits

    return (load_digits().images[:n, None] > 8).astype(np.float32)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a trained model of binarised digits (evaluated, calibrated) and an input of each kind its
    commands read: binary arrays, latent codes, an image folder and compressed files."""
    w = tmp_path_factory.mktemp("workspace")
    run = w / "run"
    steps = [
        [
            "train",
            "--binarize",
            "--epochs",
            "2",
            "--out",
            run,
            "--no-plots",
            "--no-report",
            "-q",
            "--set",
            "train.keep_checkpoints=2",
        ],  # fmt: skip
        ["evaluate", run, "--k", "2"],
        ["anomaly", "calibrate", run, "--k", "5"],
        ["encode", run, "-o", w / "latents.npy"],
        ["compress", run, w / "bin.npy", "-o", w / "c.vkz", "-q"],
        ["compress", run, w / "pngs", "-o", w / "f.vkz", "-q"],
    ]
    np.save(w / "bin.npy", binary_digits(40))
    for i, image in enumerate(binary_digits(12)):
        (w / "pngs" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(w / "pngs" / "ab"[i % 2] / f"{i}.png")
    for argv in steps:
        assert main([str(a) for a in argv]) == 0, argv
    return w


# ---------------------------------------------------------------- signals at seeded moments of every command

RUN_PLOTS = [f"run/plots/{p}" for p in PLOTS]
# Each command: its arguments ({w} is the trial's copy of the workspace) and its outputs, which must be all there
# or none of them.
COMMANDS: dict[str, tuple[list[str], list[str]]] = {
    "train": (["train", "--binarize", "--epochs", "2", "--out", "{w}/new", "--set", "train.checkpoint_every=5"],
              [f"new/plots/{p}" for p in PLOTS] + ["new/report.html"]),  # a stopped run's model files: by resuming
    "resume": (["train", "--resume", "{w}/run", "--epochs", "3"], RUN_PLOTS + ["run/report.html"]),
    "evaluate": (["evaluate", "{w}/run", "--k", "20", "--split", "train", "--limit", "300"],
                 ["run/evaluation-train-first300.json", "run/evaluation-train-first300.npz"]),
    "sample": (["sample", "{w}/run", "-o", "{w}/s.png", "--npy", "{w}/s.npy"], ["s.png", "s.npy"]),
    "reconstruct": (["reconstruct", "{w}/run", "-o", "{w}/r.png"], ["r.png"]),
    "encode": (["encode", "{w}/run", "-o", "{w}/codes.npz"], ["codes.npz"]),
    "decode": (["decode", "{w}/run", "{w}/latents.npy", "-o", "{w}/d.png", "--npy", "{w}/d.npy"], ["d.png", "d.npy"]),
    "plot": (["plot", "{w}/run"], RUN_PLOTS),
    "report": (["report", "{w}/run", "-o", "{w}/page.html"], ["page.html"]),
    "compress": (["compress", "{w}/run", "{w}/bin.npy", "-o", "{w}/again.vkz", "-q", "--report"], ["again.vkz"]),
    "decompress": (["decompress", "{w}/f.vkz", "--run", "{w}/run", "-o", "{w}/unpacked", "-q"], ["unpacked"]),
    "anomaly calibrate": (["anomaly", "calibrate", "{w}/run", "--fpr", "0.05", "--k", "20"], ["run/anomaly.json"]),
    "anomaly score": (["anomaly", "score", "{w}/run", "--data", "{w}/bin.npy", "-o", "{w}/scores.csv"],
                      ["scores.csv"]),
    "anomaly report": (["anomaly", "report", "{w}/run", "--normal", "0,1,2,3,4"],
                       [f"run/anomaly-report/{f}" for f in ("report.json", "roc.png", "scores.png", "extremes.png")]),
    "benchmark": (["benchmark", "one-class", "--data", "digits", "--classes", "0", "--epochs", "1", "--out",
                   "{w}/bench", "--device", "cpu"], ["bench/results.csv", "bench/results.md"]),
}  # fmt: skip
SIGNAL_TRIALS = 1080 if SLOW else 120  # 72 or 8 per command
START = 0.1  # seconds: before, Python itself is starting and vaekit's handlers are not yet in place (see README)


def _prepare(name: str, w: Path) -> None:
    """A command's starting state: calibrate writes anomaly.json, which the other commands' workspace holds."""
    if name == "anomaly calibrate":
        (w / "run" / "anomaly.json").unlink()


def _launch(name: str, w: Path, delay: float | None, sig: int) -> tuple[int, str, float]:
    """Run one command in a new process, send it sig after delay seconds (never when None): exit code, stderr and
    wall time."""
    argv, _ = COMMANDS[name]
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vaekit", *(a.replace("{w}", str(w)) for a in argv)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    if delay is not None:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err, time.perf_counter() - began


def _resumable(folder: Path, capsys: pytest.CaptureFixture[str]) -> str | None:
    """Why a stopped training run in folder cannot be continued or started again as it is (None if it can)."""
    if not (folder / "config.toml").exists():
        # Stopped before it claimed the folder: training into it again must be accepted.
        argv = ["train", "--binarize", "--epochs", "1", "--out", folder, "--no-plots", "-q"]
    else:
        argv = ["train", "--resume", folder, "--no-plots", "-q"]
    code, err = cli(argv, capsys)
    return None if code == 0 or (code == 2 and "has finished" in err) else f"{argv[1]}: exit {code}: {err[-300:]}"


def test_signals_at_seeded_moments_of_every_command(workspace, tmp_path, capsys):
    """SIGINT or SIGTERM at a seeded random moment of each command, from start-up to a little after its usual end: a
    normal exit or 128 + the signal, at most one line on stderr and no traceback, no temporary files, the outputs all
    there or none of them, and a stopped training run that continues (or starts again) as it is."""
    rng = random.Random(0)
    names = sorted(COMMANDS)
    spaces = {}

    def space(key: str, name: str) -> Path:
        spaces[key] = w = tmp_path / key
        shutil.copytree(workspace, w)
        _prepare(name, w)
        return w

    with ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        # First each command once without a signal: it must succeed, and its time sets the range of the moments.
        plain = dict(zip(names, pool.map(lambda n: _launch(n, space(f"plain-{n}", n), None, 0), names), strict=True))
        for name, (code, err, _) in plain.items():
            assert code == 0, (name, err)
            assert all((spaces[f"plain-{name}"] / out).exists() for out in COMMANDS[name][1]), name
        trials = [(names[i % len(names)], rng.choice([signal.SIGINT, signal.SIGTERM])) for i in range(SIGNAL_TRIALS)]
        moments = [rng.uniform(START, 1.1 * plain[name][2]) for name, _ in trials]
        results = list(pool.map(lambda t: _launch(t[1][0], space(f"{t[0]}", t[1][0]), moments[t[0]], t[1][1]),
                                enumerate(trials)))  # fmt: skip
    stopped, problems = 0, []
    for i, ((name, sig), (code, err, _)) in enumerate(zip(trials, results, strict=True)):
        w = spaces[str(i)]
        present = [(w / out).exists() for out in COMMANDS[name][1]]
        found = {
            "exit code": code in (0, 128 + sig, -sig),
            "one line, no traceback": "Traceback" not in err and len(err.strip().splitlines()) <= 1,
            "no temporary file": not temporary_files(w),
            "outputs all or none": all(present) or not any(present),
            "outputs after exit 0": all(present) or code != 0,
        }
        if code != 0 and name in ("train", "resume"):
            folder = w / ("new" if name == "train" else "run")
            found["resumable"] = not folder.exists() or _resumable(folder, capsys) is None
        problems += [(i, name, sig.name, f"{moments[i]:.2f} s", code, what, err[-300:]) for what, ok in found.items()
                     if not ok]  # fmt: skip
        stopped += code != 0
    print(f"\n{SIGNAL_TRIALS} signal trials, {stopped} stopped by their signal, {len(problems)} problems")
    assert not problems, problems
    assert stopped >= SIGNAL_TRIALS // 2, f"only {stopped} of {SIGNAL_TRIALS} trials were stopped by their signal"


# ---------------------------------------------------------------- corrupted files, generated


def corruptions(raw: bytes, rng: random.Random, flips: int) -> dict[str, bytes | None]:
    """Seeded damage to a file's bytes; None stands for a directory in its place."""
    other = b"PK\x03\x04" if raw.startswith(b"\x89PNG") else b"\x89PNG\r\n\x1a\n"
    found: dict[str, bytes | None] = {"empty": b"", "directory": None, "other format": other + raw[len(other) :]}
    for cut, at in zip(rng.sample(range(len(raw)), flips), rng.sample(range(len(raw)), flips), strict=True):
        found[f"truncated at {cut}"] = raw[:cut]
        found[f"byte {at} flipped"] = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
    return found


def damage(path: Path, data: bytes | None) -> None:
    """Put data in place of path's bytes, or a directory where data is None."""
    if data is None:
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(data)


def _amat(d: Path, zipped: bool) -> None:
    folder = d / "binarized_mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("valid", 20), ("test", 20)):
        text = "".join(" ".join(map(str, row)) + "\n" for row in rng.integers(0, 2, (n, 784))).encode()
        name = f"binarized_mnist_{split}.amat"
        (folder / (name + ".gz" if zipped else name)).write_bytes(gzip.compress(text) if zipped else text)


def _csv(d: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [f"{a:.4f},{b:.4f},{c:.4f}" for a, b, c in rng.normal(size=(80, 3))]
    (d / "table.csv").write_text("a,b,c\n" + "\n".join(rows) + "\n")


def _images(d: Path, suffix: str) -> None:
    for i, image in enumerate(binary_digits(8)):
        (d / "images" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(d / "images" / "ab"[i % 2] / f"{i}{suffix}")


TRAIN = ["train", "--epochs", "1", "--no-plots", "-q", "--out", "{o}/new"]
# Each kind of input: how to make a good one in a folder {d}, the file in it to damage, and the commands that read it
# with the outputs they must not leave behind when they refuse it ({o} is a folder for outputs; {w} the workspace).
INPUTS: dict[str, tuple[Callable[[Path, Path], object], str, list[list[str]]]] = {
    "npy": (lambda d, w: np.save(d / "x.npy", binary_digits(60)), "x.npy",
            [[*TRAIN, "--data", "{d}/x.npy"], ["anomaly", "score", "{w}/run", "--data", "{d}/x.npy", "-o", "{o}/s.csv"],
             ["compress", "{w}/run", "{d}/x.npy", "-o", "{o}/x.vkz", "-q"]]),
    "npz": (lambda d, w: np.savez(d / "x.npz", x_train=binary_digits(60), x_test=binary_digits(20),
                               y_train=np.arange(60) % 3, y_test=np.arange(20) % 3), "x.npz",
            [[*TRAIN, "--data", "{d}/x.npz"],
             ["anomaly", "score", "{w}/run", "--data", "{d}/x.npz", "--split", "train", "-o", "{o}/s.csv"]]),
    "csv": (lambda d, w: _csv(d), "table.csv",
            [[*TRAIN, "--data", "{d}/table.csv", "--set", "model.likelihood=gaussian"]]),
    "png folder": (lambda d, w: _images(d, ".png"), "images/a/0.png",
                   [[*TRAIN, "--data", "{d}/images"], ["compress", "{w}/run", "{d}/images", "-o", "{o}/i.vkz", "-q"],
                    ["anomaly", "score", "{w}/run", "--data", "{d}/images", "-o", "{o}/s.csv"]]),
    "jpeg folder": (lambda d, w: _images(d, ".jpg"), "images/b/1.jpg", [[*TRAIN, "--data", "{d}/images"]]),
    "mnist images": (lambda d, w: write_fake_mnist(d), "MNIST/raw/train-images-idx3-ubyte.gz",
                     [[*TRAIN, "--data", "mnist", "--data-dir", "{d}", "--no-download"]]),
    "mnist labels": (lambda d, w: write_fake_mnist(d), "MNIST/raw/t10k-labels-idx1-ubyte.gz",
                     [[*TRAIN, "--data", "mnist", "--data-dir", "{d}", "--no-download"]]),
    "amat": (lambda d, w: _amat(d, False), "binarized_mnist/binarized_mnist_train.amat",
             [[*TRAIN, "--data", "binarized-mnist", "--data-dir", "{d}", "--no-download"]]),
    "amat.gz": (lambda d, w: _amat(d, True), "binarized_mnist/binarized_mnist_valid.amat.gz",
                [[*TRAIN, "--data", "binarized-mnist", "--data-dir", "{d}", "--no-download"]]),
    "latents": (lambda d, w: shutil.copy(w / "latents.npy", d), "latents.npy",
                [["decode", "{w}/run", "{d}/latents.npy", "-o", "{o}/d.png", "--npy", "{o}/d.npy"]]),
    "vkz": (lambda d, w: shutil.copy(w / "c.vkz", d), "c.vkz",
            [["decompress", "{d}/c.vkz", "--run", "{w}/run", "-o", "{o}/x.npy", "-q"]]),
    "vkz of a folder": (lambda d, w: shutil.copy(w / "f.vkz", d), "f.vkz",
                        [["decompress", "{d}/f.vkz", "--run", "{w}/run", "-o", "{o}/images", "-q"]]),
}  # fmt: skip
DATA_FLIPS = 42 if SLOW else 2  # 87 or 7 damaged files of each kind


def test_corrupted_inputs_of_every_format_are_one_line_errors_and_write_nothing(workspace, tmp_path, capsys):
    """Every input format (arrays, tables, image folders, MNIST archives, binarised MNIST text, latent codes and
    compressed files), damaged in each generated way, under every command that reads it: a normal exit (damage a
    reader cannot tell from data, such as a flipped pixel) or exit 2 with one line, no traceback, no output and no
    temporary file; a compressed file, which holds a checksum, is always refused. A damaged MNIST archive spoils
    nothing: the intact one loads at once."""
    rng = random.Random(1)
    files = refused = 0
    for kind, (make, name, commands) in INPUTS.items():
        good = tmp_path / f"good-{kind}"
        good.mkdir()
        make(good, workspace)
        for how, data in corruptions((good / name).read_bytes(), rng, DATA_FLIPS).items():
            d, o = tmp_path / "input", tmp_path / "outputs"
            for folder in (d, o):
                shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(good, d)
            damage(d / name, data)
            files += 1
            for argv in commands:
                o.mkdir()
                before = snapshot(d)
                code, err = cli([a.format(w=workspace, d=d, o=o) for a in argv], capsys)
                what = (kind, how, argv[0], code, err[-300:])
                assert code in (0, 2) and "Traceback" not in err, what
                assert not temporary_files(d) and not temporary_files(o), what
                if code == 2:
                    refused += 1
                    assert len(err.splitlines()) == 1 and err.startswith("vaekit: error:"), what
                    assert not any(o.iterdir()), (what, list(o.iterdir()))
                    if not kind.startswith("mnist"):  # MNIST's intact archives are unpacked beside it, as a cache
                        assert snapshot(d) == before, what
                elif kind.startswith("vkz"):
                    assert data == (good / name).read_bytes(), f"a damaged compressed file was accepted: {what}"
                shutil.rmtree(o)
            if kind.startswith("mnist"):
                if (d / name).is_dir():
                    (d / name).rmdir()
                shutil.copy(good / name, d / name)
                o.mkdir()
                code, err = cli([a.format(w=workspace, d=d, o=o) for a in commands[0]], capsys)
                assert code == 0, (kind, how, "the intact archive again", err)
                shutil.rmtree(o)
    print(f"\n{files} damaged input files, {refused} refusals")
    assert files == len(INPUTS) * (3 + 2 * DATA_FLIPS)
    assert refused >= files // 2, f"only {refused} refusals for {files} damaged files"


# ---------------------------------------------------------------- corrupted run files, generated

RUN_FILES = ["config.toml", "model.safetensors", "model.json", "metrics.jsonl", "evaluation.json", "anomaly.json",
             "written.txt", "checkpoint"]  # fmt: skip
READERS = {
    "evaluate": ["evaluate", "{run}", "--k", "2"],
    "sample": ["sample", "{run}", "-n", "4", "-o", "{run}/s.png"],
    "plot": ["plot", "{run}"],
    "resume": ["train", "--resume", "{run}", "--epochs", "3", "--no-plots", "-q"],
    "compress": ["compress", "{run}", "{w}/bin.npy", "-o", "{run}/c.vkz", "-q"],
    "anomaly score": ["anomaly", "score", "{run}", "--data", "{w}/bin.npy", "-o", "{run}/s.csv"],
}
RUN_FLIPS = 10 if SLOW else 1  # 23 or 5 damaged versions of each file


def test_corrupted_run_files_are_one_line_errors_and_change_nothing(workspace, tmp_path, capsys):
    """Every file of a run (config, weights, description, metrics, evaluation, calibration, record, checkpoint)
    damaged in each generated way, under every command that reads runs: a normal exit (damage a reader cannot see,
    such as a flipped weight) or exit 2 with one line, no traceback, and the run as it was (a resume that started,
    say from weights a flipped byte made huge, keeps its new epoch count)."""
    rng = random.Random(0)
    source = workspace / "run"
    checkpoint = sorted((source / "checkpoints").glob("*.safetensors"))[-1].relative_to(source)
    trials = 0
    for name in RUN_FILES:
        relative = checkpoint if name == "checkpoint" else Path(name)
        for how, data in corruptions((source / relative).read_bytes(), rng, RUN_FLIPS).items():
            for command, argv in READERS.items():
                run = tmp_path / "run"
                shutil.rmtree(run, ignore_errors=True)
                shutil.copytree(source, run)
                damage(run / relative, data)
                before = snapshot(run)
                code, err = cli([a.format(run=run, w=workspace) for a in argv], capsys)
                what = (name, how, command, code, err[-300:])
                assert code in (0, 2) and "Traceback" not in err, what
                if code == 2:
                    assert len(err.splitlines()) == 1 and err.startswith("vaekit: error:"), what
                    after = snapshot(run)
                    if command == "resume":  # a resume that started records its new epoch count, and nothing else
                        before.pop("config.toml", None), after.pop("config.toml", None)
                    assert after == before, what
                trials += 1
    print(f"\n{len(RUN_FILES) * (3 + 2 * RUN_FLIPS)} damaged run files, {trials} trials")
    assert trials == len(RUN_FILES) * (3 + 2 * RUN_FLIPS) * len(READERS)

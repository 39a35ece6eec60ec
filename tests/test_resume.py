"""Long runs: checkpoints, exact resuming after SIGKILL/SIGTERM/SIGINT, early stopping, non-finite steps, no pickles.

Every run here is real training on scikit-learn's digits (1438 training examples, 23 steps per epoch at batch 64).
Killed and reference runs are real `python -m vaekit` processes, run side by side where they are independent; each
process gets one torch thread (OMP_NUM_THREADS=1), so that on a small machine they do not wait on each other's
threads. Every comparison is between runs made with the same settings and thread count: no loss value is hard-coded.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, load_file, save

import vaekit
from vaekit.cli import main
from vaekit.data import Dataset, Split
from vaekit.model import mean_loss

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS_PER_EPOCH = 23  # ceil(1438 / 64)
EPOCHS, EVERY = 40, 5  # the killed runs: 920 steps, a checkpoint every 5 steps and at each epoch's end
TOTAL = EPOCHS * STEPS_PER_EPOCH
TRAIN = ["train", "--epochs", str(EPOCHS), "--no-plots", "-q", "--set", f"train.checkpoint_every={EVERY}"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEP_FILE = re.compile(r"step-(\d+)\.safetensors")


# ---------------------------------------------------------------- helpers


def start(args: list[str | Path]) -> subprocess.Popen[str]:
    """Start `python -m vaekit ARGS` in the background, capturing its output."""
    return subprocess.Popen(
        [sys.executable, "-m", "vaekit", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    """Wait for a process; its exit code, stdout and stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def steps(run: Path) -> list[int]:
    """The global steps of a run's checkpoint files, oldest first (temporary files are not counted)."""
    try:
        names = os.listdir(run / "checkpoints")
    except FileNotFoundError:
        return []
    return sorted(int(m[1]) for m in map(STEP_FILE.fullmatch, names) if m)


def newest(run: Path) -> int:
    found = steps(run)
    return found[-1] if found else -1


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], poll: float = 0.002) -> bool:
    """Poll until ready() is true (True) or the process has ended (False)."""
    while proc.poll() is None:
        if ready():
            return True
        time.sleep(poll)
    return False


def metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock column."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def assert_same_run(a: Path, b: Path) -> None:
    """Two runs ended in the same state: weights byte for byte, metrics but for time, and every tensor of the last
    checkpoint (weights, optimizer state, random states)."""
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes(), f"{a} and {b} differ"
    assert metrics(a) == metrics(b)
    assert newest(a) == newest(b)
    name = f"checkpoints/step-{newest(a):010d}.safetensors"
    ta, tb = load_file(a / name), load_file(b / name)
    assert set(ta) == set(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory, by relative path."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def cli(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run vaekit.cli.main in this process; its exit code and stderr."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits rather than returning
        code = e.code
    return code, capsys.readouterr().err


def one_error_line(code: int | str | None, err: str) -> str:
    lines = err.splitlines()
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert lines[0].startswith("vaekit: error:"), lines[0]
    return lines[0]


def quiet(**kw) -> dict:
    return {"verbose": False, **kw}


# ---------------------------------------------------------------- runs in other processes

STOPS = {
    "SIGTERM": ([signal.SIGTERM], 143),
    "SIGINT": ([signal.SIGINT], 130),
    "SIGINT-twice": ([signal.SIGINT, signal.SIGINT], 130),  # a second Ctrl-C stops at once
}


def _resume(run: Path) -> tuple[int, str, str]:
    return finish(start(["train", "--resume", run, "--no-plots", "-q"]))


def _stop_and_resume(run: Path, signals: list[int], threshold: int) -> dict:
    """Train into run, send it signals once its newest checkpoint passes threshold, then resume it to the end."""
    proc = start([*TRAIN, "--out", run])
    if not wait_for(proc, lambda: newest(run) > threshold):
        return {"failed": f"{run.name} ended before step {threshold}: {finish(proc)}"}
    at = newest(run)
    for s in signals:
        proc.send_signal(s)
    code, _, err = finish(proc)
    found, rows = steps(run), len(metrics(run)) if (run / "metrics.jsonl").exists() else 0
    return {"code": code, "err": err, "at": at, "steps": found, "epochs": rows, "resumed": _resume(run)}


class Reference:
    """The uninterrupted run that killed and stopped runs must end up equal to, started in the background once."""

    def __init__(self, out: Path) -> None:
        self.dir = out
        self.proc = start([*TRAIN, "--out", out])

    def done(self) -> Path:
        code, _, err = finish(self.proc)
        assert code == 0, f"reference run exited {code}:\n{err}"
        return self.dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    ref = Reference(tmp_path_factory.mktemp("reference") / "A")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.communicate()


# ---------------------------------------------------------------- SIGKILL at random moments, then resume


@pytest.mark.heavy
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(reference, tmp_path):
    """A run killed with SIGKILL four times, once before its first checkpoint and three times at random moments of
    resumed processes, and resumed after each, ends bitwise identical to a run that was never stopped."""
    rng = random.Random(20260305)
    run = tmp_path / "B"
    kills: list[str] = []

    # 1. Killed right after the run directory has its config, before the first checkpoint (5 steps later). Should
    # the checkpoint win that race on a busy machine, the attempt is repeated on a fresh directory.
    for _ in range(5):
        shutil.rmtree(run, ignore_errors=True)
        proc = start([*TRAIN, "--out", run])
        assert wait_for(proc, (run / "config.toml").exists, poll=0.0002), finish(proc)
        proc.kill()
        assert finish(proc)[0] == -signal.SIGKILL
        if not steps(run):
            break
    else:
        pytest.fail("could not kill the run before its first checkpoint in 5 tries")
    assert not (run / "model.safetensors").exists()
    kills.append("before the first checkpoint")

    # 2-4. Resumed processes, each killed at a random moment after its newest checkpoint passes a random step.
    for segment in range(3):
        threshold = rng.randrange(20 + 250 * segment, 220 + 250 * segment)
        delay = rng.uniform(0, 0.05)
        proc = start(["train", "--resume", run, "--no-plots", "-q"])
        if wait_for(proc, lambda t=threshold: newest(run) > t):
            time.sleep(delay)
            proc.kill()
        code, _, err = finish(proc)
        assert code == -signal.SIGKILL, f"resumed process was not killed after step {threshold} (exit {code}):\n{err}"
        kills.append(f"resumed, after step {threshold} + {delay:.3f} s, newest checkpoint {newest(run)}")
        assert newest(run) > threshold

    code, out, err = finish(start(["train", "--resume", run, "--no-plots", "-q"]))
    assert code == 0, f"the last resume exited {code}:\n{err}"
    assert out.strip().splitlines()[-1] == str(run)
    assert len(kills) >= 3 and any(k.startswith("resumed") for k in kills)
    assert [r["epoch"] for r in metrics(run)] == list(range(1, EPOCHS + 1))
    assert_same_run(reference.done(), run)


# ---------------------------------------------------------------- SIGTERM and SIGINT


@pytest.mark.heavy
def test_sigterm_and_sigint_save_a_checkpoint_and_resume_exactly(reference, tmp_path):
    """SIGTERM exits 143 and SIGINT 130 with one line naming the saved checkpoint and `vaekit train --resume RUN`;
    resuming then ends bitwise identical to a run that was never stopped, also after a double Ctrl-C."""
    rng = random.Random(7)
    runs = {name: tmp_path / name for name in STOPS}
    with ThreadPoolExecutor(len(STOPS)) as pool:
        futures = {
            name: pool.submit(_stop_and_resume, runs[name], sigs, rng.randrange(30, TOTAL // 2))
            for name, (sigs, _) in STOPS.items()
        }
        results = {name: (runs[name], f.result()) for name, f in futures.items()}
    ref = reference.done()
    for name, (run, r) in results.items():
        assert "failed" not in r, r.get("failed")
        err = r["err"]
        assert r["code"] == STOPS[name][1], f"{name}: exit code {r['code']}, stderr:\n{err}"
        assert "Traceback" not in err
        assert len(err.splitlines()) == 1, f"{name}: stderr is not one line:\n{err}"
        line = err.strip()
        assert r["steps"] and r["steps"][-1] >= r["at"]
        assert r["epochs"] < EPOCHS
        if name == "SIGINT-twice" and line == "vaekit: interrupted":
            pass  # the second signal came before the first was handled: stopped at once
        else:
            assert line.startswith(f"vaekit: {name.split('-')[0]}: training stopped"), line
            assert line.endswith(f"continue with: vaekit train --resume {run}"), line
            saved = Path(re.search(r" and saved (\S+); ", line)[1])  # type: ignore[index]
            assert saved.parent == run / "checkpoints"
            assert saved.name == f"step-{r['steps'][-1]:010d}.safetensors", (saved, r["steps"])
        code, out, err = r["resumed"]
        assert code == 0, f"{name}: resume exited {code}:\n{err}"
        assert out.strip().splitlines()[-1] == str(run)
        assert_same_run(ref, run)


def test_sigterm_to_this_process_stops_after_its_step_with_a_checkpoint_to_resume(digits, tmp_path):
    """A SIGTERM during training (here sent by the process to itself once the first checkpoint is written) stops the
    run after its step with exit code 143, saving a checkpoint of that step and saying how to continue."""
    run = tmp_path / "run"
    first = run / "checkpoints" / f"step-{EVERY:010d}.safetensors"

    def signal_after_the_first_checkpoint() -> None:
        while not first.exists():
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # a signal that comes too late must not end pytest
    try:
        watcher = threading.Thread(target=signal_after_the_first_checkpoint, daemon=True)
        watcher.start()
        with pytest.raises(vaekit.Interrupted) as stopped:
            vaekit.train("digits", run, epochs=EPOCHS, checkpoint_every=EVERY, **quiet(dataset=digits))
        watcher.join(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    said = re.fullmatch(rf"SIGTERM: training stopped in epoch (\d+) after step (\d+) and saved (\S+); continue with: "
                        rf"vaekit train --resume {re.escape(str(run))}", str(stopped.value))  # fmt: skip
    assert said, str(stopped.value)
    epoch, step = int(said[1]), int(said[2])
    assert said[3] == str(run / "checkpoints" / f"step-{(epoch - 1) * STEPS_PER_EPOCH + step:010d}.safetensors")
    assert Path(said[3]).is_file()


def test_sigterm_during_an_epochs_end_stops_after_that_epoch(digits, tmp_path):
    """A SIGTERM that arrives while the end of an epoch that is not the last is evaluated (here a large test split)
    stops the run after that epoch, with the epoch's checkpoint."""
    test = digits.split("test")
    data = Dataset("digits", {"train": digits.split("train"), "test": Split(test.x.repeat(200, 1, 1, 1), None)})
    run = tmp_path / "run"
    last_step = run / "checkpoints" / f"step-{STEPS_PER_EPOCH:010d}.safetensors"  # written at epoch 1's last step

    def signal_during_the_evaluation() -> None:
        while not last_step.exists():
            time.sleep(0.0005)
        time.sleep(0.005)  # evaluating the 71,800 test examples takes far longer
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        watcher = threading.Thread(target=signal_during_the_evaluation, daemon=True)
        watcher.start()
        with pytest.raises(vaekit.Interrupted) as stopped:
            vaekit.train("digits", run, epochs=2, checkpoint_every=STEPS_PER_EPOCH, **quiet(dataset=data))
        watcher.join(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert str(stopped.value) == (
        f"SIGTERM: training stopped after epoch 1 and saved {last_step}; continue with: vaekit train --resume {run}"
    )
    assert [m["epoch"] for m in vaekit.read_metrics(run)] == [1]


def test_a_signal_after_the_last_step_does_not_ask_for_a_useless_resume(digits, tmp_path):
    """A SIGTERM that arrives during the last epoch's end (here: while a large test split is evaluated) is no
    interruption: the run finishes, and resuming it is refused like any finished run."""
    test = digits.split("test")
    data = Dataset("digits", {"train": digits.split("train"), "test": Split(test.x.repeat(200, 1, 1, 1), None)})
    run = tmp_path / "run"
    last = run / "checkpoints" / f"step-{2 * STEPS_PER_EPOCH:010d}.safetensors"  # written at the last step too

    def signal_after_the_last_step() -> None:
        while not last.exists():
            time.sleep(0.0005)
        time.sleep(0.005)  # the last step is done; evaluating the 71,800 test examples takes far longer
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # a signal that comes too late must not end pytest
    try:
        watcher = threading.Thread(target=signal_after_the_last_step, daemon=True)
        watcher.start()
        try:
            vaekit.train("digits", run, epochs=2, checkpoint_every=STEPS_PER_EPOCH, **quiet(dataset=data))
            stopped = None
        except vaekit.Interrupted as e:
            stopped = e
        watcher.join(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    # The signal comes after the checkpoint of the last step, so it cannot interrupt anything that is left.
    assert stopped is None, f"a finished run was reported as interrupted: {stopped}"
    with pytest.raises(vaekit.VaekitError, match="finished its 2 epochs"):
        vaekit.resume(run, dataset=data, verbose=False)


# ---------------------------------------------------------------- resuming through the API


@pytest.mark.parametrize("scheduler", ["", "StepLR"])
def test_resume_with_more_epochs_equals_a_longer_run(digits, tmp_path, scheduler):
    """3 epochs, then resume(run, epochs=5), equal a 5-epoch run bitwise (with a scheduler, its learning rates too)."""
    kw = quiet(dataset=digits, checkpoint_every=7)
    if scheduler:
        kw.update(scheduler=scheduler, scheduler_args={"step_size": 2, "gamma": 0.5})
    whole = vaekit.train("digits", tmp_path / "whole", epochs=5, **kw)
    short = vaekit.train("digits", tmp_path / "short", epochs=3, **kw)
    assert len(short.metrics) == 3
    longer = vaekit.resume(short.dir, epochs=5, dataset=digits, verbose=False)
    assert longer.dir == short.dir
    assert [r["epoch"] for r in longer.metrics] == [1, 2, 3, 4, 5]
    assert vaekit.load_config(short.dir).train.epochs == 5
    assert_same_run(whole.dir, short.dir)
    if scheduler:
        assert [r["lr"] for r in metrics(short.dir)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]


@pytest.mark.parametrize("step", [10, 23, 40, 60])
def test_resume_from_an_older_checkpoint_file(digits, tmp_path, step):
    """Resuming from an older checkpoint file (mid-epoch or an epoch's end) ends bitwise identical."""
    run = vaekit.train(
        "digits", tmp_path / "run", epochs=3, **quiet(dataset=digits, checkpoint_every=10, keep_checkpoints=100)
    )
    before = snapshot(run.dir)
    older = run.dir / "checkpoints" / f"step-{step:010d}.safetensors"
    assert older.is_file()
    vaekit.resume(older, dataset=digits, verbose=False)
    after = snapshot(run.dir)
    assert after["model.safetensors"] == before["model.safetensors"]
    assert metrics(run.dir) == [{k: v for k, v in r.items() if k != "seconds"} for r in run.metrics]
    assert sorted(after) == sorted(before)
    for name in after:
        if name.startswith("checkpoints/"):
            a, b = load(after[name]), load(before[name])
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_from_an_older_checkpoint_through_the_command(digits, tmp_path, capsys):
    """`vaekit train --resume RUN/checkpoints/step-N.safetensors` goes back to that checkpoint and ends identically."""
    run = vaekit.train("digits", tmp_path / "run", epochs=2, **quiet(dataset=digits, keep_checkpoints=2))
    weights, rows = (run.dir / "model.safetensors").read_bytes(), metrics(run.dir)
    assert steps(run.dir) == [23, 46]
    code, err = cli(
        ["train", "--resume", run.dir / "checkpoints" / "step-0000000023.safetensors", "--no-plots", "-q"], capsys
    )
    assert code == 0, err
    assert (run.dir / "model.safetensors").read_bytes() == weights
    assert metrics(run.dir) == rows


# ---------------------------------------------------------------- non-finite losses


def _with_train_x(data: Dataset, x: torch.Tensor) -> Dataset:
    train = data.split("train")
    return Dataset(data.name, {**data.splits, "train": Split(x, train.y)})


def test_a_nan_example_skips_one_update_per_epoch(digits, tmp_path, capsys):
    """One NaN training example spoils one batch per epoch: that update is skipped and counted, and reported once
    per epoch; the weights and losses stay finite, and resuming such a run is still exact."""
    x = digits.split("train").x.clone()
    x[100] = math.nan
    data = _with_train_x(digits, x)
    capsys.readouterr()
    run = vaekit.train("digits", tmp_path / "run", epochs=3, dataset=data, checkpoint_every=4, verbose=True)
    err = capsys.readouterr().err
    assert [r["skipped"] for r in run.metrics] == [1, 1, 1]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"]) for r in run.metrics)
    assert err.count("non-finite loss or gradient, update skipped") == 3, err
    model = vaekit.load(run.dir)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())

    part = vaekit.train("digits", tmp_path / "part", epochs=1, dataset=data, checkpoint_every=4, verbose=False)
    vaekit.resume(part.dir, epochs=3, dataset=data, verbose=False)
    assert_same_run(run.dir, part.dir)


# Adam at lr 0.1 for two epochs, then at lr 100 (StepLR): the first update of epoch 3 (global step 47) throws the
# weights so far that every later loss is infinite. With checkpoints every 2 steps the last good one is step 46.
DIVERGES = {
    "lr": 0.1,
    "scheduler": "StepLR",
    "scheduler_args": {"step_size": 2, "gamma": 1000.0},
    "checkpoint_every": 2,
}


def _diverge(digits: Dataset, run: Path, skip_limit: int, epochs: int = 4) -> str:
    """Train the diverging run; the skip-limit error's message."""
    with pytest.raises(vaekit.VaekitError, match=f"not finite in {skip_limit} steps in a row") as e:
        vaekit.train("digits", run, epochs=epochs, skip_limit=skip_limit, **quiet(dataset=digits, **DIVERGES))
    return str(e.value)


def test_skip_limit_stops_with_the_last_good_checkpoint(digits, tmp_path):
    """skip_limit non-finite steps in a row raise an error naming the last good checkpoint, which holds finite
    weights; resuming from it meets the same divergence and changes no file."""
    run = tmp_path / "run"
    message = _diverge(digits, run, skip_limit=3)
    last = run / "checkpoints" / "step-0000000046.safetensors"
    assert str(last) in message
    assert steps(run) == [44, 46]  # none at step 48 or 50 although checkpoint_every is 2
    assert all(torch.isfinite(t).all() for k, t in load_file(last).items() if k.startswith("model."))
    before = snapshot(run)
    with pytest.raises(vaekit.VaekitError) as again:
        vaekit.resume(run, dataset=digits, verbose=False)
    assert str(again.value) == message
    assert snapshot(run) == before


def test_no_checkpoint_is_written_while_steps_are_skipped(digits, tmp_path):
    """A streak of skipped steps across an epoch's end writes no checkpoint; the error names the one before it."""
    run = tmp_path / "run"
    message = _diverge(digits, run, skip_limit=30)  # 22 skipped steps end epoch 3, the 30th is in epoch 4
    assert steps(run) == [44, 46]
    assert "step-0000000046.safetensors" in message
    assert [r["skipped"] for r in vaekit.read_metrics(run)] == [0, 0, 22]


def test_a_run_whose_last_steps_were_skipped_is_still_finished(digits, tmp_path):
    """A run that ends inside a streak shorter than skip_limit ends normally: its last checkpoint records that it
    is finished, an epoch without a single update has train_loss null (metrics.jsonl stays strict JSON), and
    resuming it is refused like any finished run."""
    run = vaekit.train("digits", tmp_path / "run", epochs=4, skip_limit=100, **quiet(dataset=digits, **DIVERGES))
    assert [r["skipped"] for r in run.metrics] == [0, 0, 22, STEPS_PER_EPOCH]
    assert [r["train_loss"] is None for r in vaekit.read_metrics(run.dir)] == [False, False, False, True]

    def reject(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    for line in (run.dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=reject)
    assert steps(run.dir) == [46, 4 * STEPS_PER_EPOCH]
    with pytest.raises(vaekit.VaekitError, match="finished its 4 epochs"):
        vaekit.resume(run.dir, dataset=digits, verbose=False)


def test_resume_refuses_other_data(digits, tmp_path):
    """A checkpoint resumes only on the data it was made with: the same number of examples is not enough."""
    run = vaekit.train("digits", tmp_path / "run", epochs=1, **quiet(dataset=digits))
    other = _with_train_x(digits, 1 - digits.split("train").x)
    before = snapshot(run.dir)
    with pytest.raises(vaekit.VaekitError, match="not those .* was trained on: their train split"):
        vaekit.resume(run.dir, epochs=2, dataset=other, verbose=False)
    assert snapshot(run.dir) == before


# ---------------------------------------------------------------- no pickle is ever loaded


class _Payload:
    """Unpickling this opens (creates) a file: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle(payload: Path) -> bytes:
    blob = pickle.dumps(_Payload(payload))
    pickle.loads(blob)  # the sanity check: this pickle does run its code when loaded
    assert payload.exists()
    payload.unlink()
    return blob


def _torch_save(payload: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"model.encoder.0.weight": torch.zeros(4, 4), "payload": _Payload(payload)}, buf)
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # the sanity check, as above
    assert payload.exists()
    payload.unlink()
    return buf.getvalue()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, digits, one_thread) -> Path:
    """A finished 2-epoch run with checkpoints at steps 23 and 46; tests work on copies."""
    return vaekit.train("digits", tmp_path_factory.mktemp("finished") / "run", epochs=2, **quiet(dataset=digits)).dir


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# where the pickle goes (relative to the run) and the command that reads it
PLACES = {
    "newest-checkpoint": ("checkpoints/step-9999999999.safetensors", lambda run, tmp: ["train", "--resume", run]),
    "model-weights": ("model.safetensors", lambda run, tmp: ["sample", run, "-n", "4", "-o", tmp / "s.png"]),
    "checkpoint-file": (
        "checkpoints/ckpt.pt",
        lambda run, tmp: ["train", "--resume", run / "checkpoints" / "ckpt.pt", "--no-plots"],
    ),
}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("maker", [_pickle, _torch_save], ids=["pickle", "torch-save"])
def test_a_pickle_posing_as_a_checkpoint_or_model_is_never_loaded(finished_run, tmp_path, capsys, place, maker):
    """A malicious pickle (plain or torch.save's zip) as a checkpoint or as the weights is refused with exit code 2 and
    one line naming it, and its code never runs."""
    run = _copy(finished_run, tmp_path)
    payload = tmp_path / "pwned"
    where, argv = PLACES[place]
    (run / where).write_bytes(maker(payload))
    code, err = cli(argv(run, tmp_path), capsys)
    line = one_error_line(code, err)
    assert Path(where).name in line, line
    assert not payload.exists(), "the pickle was loaded"
    assert not (tmp_path / "s.png").exists()


# ---------------------------------------------------------------- early stopping


def test_early_stopping_keeps_the_best_model(tmp_path, capsys):
    """With a validation split and patience 3, training stops 3 epochs after the lowest validation loss, well before
    its 200 epochs; RUN/best holds that epoch's model and works as a run directory of its own."""
    settings = {"data.validation": 300, "patience": 3, "hidden": [512], "latent": 8, "lr": 1e-2, "epochs": 200}
    run = vaekit.train("digits", tmp_path / "run", **quiet(**settings))
    rows = run.metrics
    valid = [r["valid_loss"] for r in rows]
    best_epoch = valid.index(min(valid)) + 1
    assert len(rows) < 200
    assert len(rows) == best_epoch + 3
    assert all(v >= valid[best_epoch - 1] for v in valid[-3:])
    assert metrics(run.dir) == [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    # Recomputed on the device it was recorded on: another device draws other random numbers for the loss.
    best = vaekit.load(run.dir / "best", device=run.model.device)
    assert mean_loss(best, run.data.split("valid").x, run.config.train.eval_batch_size) == valid[best_epoch - 1]
    assert (run.dir / "best" / "model.safetensors").read_bytes() != (run.dir / "model.safetensors").read_bytes()
    assert vaekit.load_config(run.dir / "best").data.validation == 300
    # the same training stopped by its epoch count at the best epoch ends with those very weights
    upto = vaekit.train("digits", tmp_path / "upto", **quiet(**{**settings, "epochs": best_epoch}))
    assert (upto.dir / "model.safetensors").read_bytes() == (run.dir / "best" / "model.safetensors").read_bytes()

    code, err = cli(["evaluate", run.dir / "best", "--k", "10", "--split", "valid", "--no-save"], capsys)
    assert code == 0, err
    code, err = cli(["sample", run.dir / "best", "-n", "4", "-o", tmp_path / "s.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "s.png").is_file()

    with pytest.raises(vaekit.VaekitError, match="stopped early"):
        vaekit.resume(run.dir, epochs=400, verbose=False)


def test_checkpoints_record_settings_added_since_0_1_0_only_where_they_differ_from_their_defaults(digits, tmp_path):
    """A checkpoint's identity leaves out the settings 0.1.0 did not have while they keep their defaults, so that its
    checkpoints still resume; a setting changed from its default is recorded (and must match on resume)."""
    added = [("data", "classes"), ("data", "label_column"), ("data", "one_hot"), ("train", "precision")]
    for name, overrides in (("default", {}), ("bf16", {"precision": "bf16"})):
        run = vaekit.train("digits", tmp_path / name, epochs=1, **quiet(dataset=digits, **overrides))
        newest = sorted((run.dir / "checkpoints").glob("step-*.safetensors"))[-1]
        with safe_open(str(newest), framework="pt") as f:
            settings = json.loads(f.metadata()["vaekit"])["identity"]["settings"]
        recorded = [(section, key) for section, key in added if key in settings[section]]
        assert recorded == ([] if name == "default" else [("train", "precision")])


def test_a_validation_loss_that_only_ties_the_best_is_no_improvement(tmp_path, capsys):
    """Early stopping waits for a lower validation loss, not an equal one: with a learning rate too small to change
    any weight, every epoch ties the first, and patience 2 stops the run after epoch 3 with epoch 1 as the best."""
    settings = {"data.validation": 200, "patience": 2, "lr": 1e-30, "epochs": 6}
    run = vaekit.train("digits", tmp_path / "run", verbose=True, **settings)
    valid = [r["valid_loss"] for r in run.metrics]
    assert len(valid) == 3 and valid[0] == valid[1] == valid[2]
    assert f"the best model, of epoch 1, is in {run.dir / 'best'}" in capsys.readouterr().out


def test_patience_needs_a_validation_split(digits, tmp_path):
    """train.patience without data.validation is refused before a run directory is written."""
    with pytest.raises(vaekit.VaekitError, match="validation"):
        vaekit.train("digits", tmp_path / "run", epochs=2, patience=3, **quiet(dataset=digits))
    assert not (tmp_path / "run" / "config.toml").exists()


# ---------------------------------------------------------------- checkpoint retention


@pytest.mark.parametrize(("every", "keep", "epochs"), [(10, 3, 3), (0, 2, 3), (7, 1, 2), (5, 4, 2), (23, 5, 3)])
def test_only_the_newest_checkpoints_are_kept(digits, tmp_path, every, keep, epochs):
    """keep_checkpoints=K leaves exactly the newest K files, named by the global steps they were written after."""
    run = vaekit.train(
        "digits",
        tmp_path / "run",
        epochs=epochs,
        **quiet(dataset=digits, checkpoint_every=every, keep_checkpoints=keep),
    )
    total = epochs * STEPS_PER_EPOCH
    written = set(range(every, total + 1, every) if every else []) | {STEPS_PER_EPOCH * e for e in range(1, epochs + 1)}
    expected = sorted(written)[-keep:]
    assert sorted(os.listdir(run.dir / "checkpoints")) == [f"step-{s:010d}.safetensors" for s in expected]


# ---------------------------------------------------------------- resume errors


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory: pytest.TempPathFactory, digits, one_thread) -> Path:
    """A checkpoint of a run with 3 latent dimensions instead of 2."""
    run = vaekit.train(
        "digits", tmp_path_factory.mktemp("latent3") / "run", epochs=1, latent=3, **quiet(dataset=digits)
    )
    return run.dir / "checkpoints" / "step-0000000023.safetensors"


def _foreign(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
    shutil.copy(checkpoint, run / "checkpoints" / "step-0000000099.safetensors")
    return ["train", "--resume", run, "--no-plots"]


def _loose(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
    shutil.copy(run / "checkpoints" / "step-0000000023.safetensors", tmp / "step-0000000023.safetensors")
    return ["train", "--resume", tmp / "step-0000000023.safetensors"]


def _plain_dir(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
    (tmp / "plain").mkdir()
    (tmp / "plain" / "notes.txt").write_text("not a run")
    return ["train", "--resume", tmp / "plain"]


def _no_checkpoints(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
    shutil.rmtree(run / "checkpoints")  # as in a run made before checkpoints existed
    return ["train", "--resume", run, "--epochs", "3"]


def _edited_config(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("lr = 0.001", "lr = 0.5"))
    return ["train", "--resume", run, "--epochs", "3"]


def _malformed(field: str, value: object) -> Callable[[Path, Path, Path], list[str | Path]]:
    """A valid checkpoint file whose progress record has field set to value."""

    def build(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
        newest = run / "checkpoints" / "step-0000000046.safetensors"
        with safe_open(str(newest), framework="pt") as f:
            meta, tensors = json.loads(f.metadata()["vaekit"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta["progress"][field] = value
        newest.write_bytes(save(tensors, metadata={"vaekit": json.dumps(meta)}))
        return ["train", "--resume", run, "--epochs", "3"]

    return build


def _written_on(device: str) -> Callable[[Path, Path, Path], list[str | Path]]:
    """The newest checkpoint made to say it was written on another device."""

    def build(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
        newest = run / "checkpoints" / "step-0000000046.safetensors"
        with safe_open(str(newest), framework="pt") as f:
            meta, tensors = json.loads(f.metadata()["vaekit"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta["device"] = device
        newest.write_bytes(save(tensors, metadata={"vaekit": json.dumps(meta)}))
        return ["train", "--resume", run, "--epochs", "3"]

    return build


def _mid_epoch(
    order: torch.Tensor | None, total: torch.Tensor | None
) -> Callable[[Path, Path, Path], list[str | Path]]:
    """The newest checkpoint made to record a position five steps into an epoch, with this data order and running
    loss (None: left out)."""

    def build(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
        newest = run / "checkpoints" / "step-0000000046.safetensors"
        with safe_open(str(newest), framework="pt") as f:
            meta, tensors = json.loads(f.metadata()["vaekit"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta["progress"]["step"] = 5
        for name, value in (("progress.order", order), ("progress.total", total)):
            if value is None:
                tensors.pop(name, None)
            else:
                tensors[name] = value
        newest.write_bytes(save(tensors, metadata={"vaekit": json.dumps(meta)}))
        return ["train", "--resume", run, "--epochs", "3"]

    return build


def _fresh_run_into(run: Path, tmp: Path, checkpoint: Path) -> list[str | Path]:
    for name in ("model.json", "model.safetensors", "metrics.jsonl"):
        (run / name).unlink()  # what a run stopped during its first epoch holds: config.toml and checkpoints
    return ["train", "--epochs", "1", "--no-plots", "--out", run]


HERE = "cuda" if torch.cuda.is_available() else "cpu"  # where device auto trains the runs above
RESUME_ERRORS = {
    "no-checkpoints-folder": (_no_checkpoints, "no checkpoints folder"),
    "edited-config": (_edited_config, "other settings or data: settings.train.lr"),
    "progress-epoch-text": (
        _malformed("epoch", "2"),
        "does not hold a training state of this run (progress.epoch is '2')",
    ),
    "progress-metrics-text": (_malformed("metrics", "oops"), "state of this run (progress.metrics is 'oops')"),
    "progress-step-past-epoch": (
        _malformed("step", 10**6),
        "state of this run (the epoch, step and metrics do not agree)",
    ),
    "progress-bad-none": (_malformed("bad", None), "state of this run (progress.bad is None)"),
    "progress-incomplete": (_malformed("unknown", 1), "state of this run (the progress record is incomplete)"),
    "progress-order-repeats": (
        _mid_epoch(torch.zeros(1438, dtype=torch.int64), torch.tensor(0.0)),
        "state of this run (the data order is not a permutation of the 1438 training examples)",
    ),
    "written-on-another-device": (
        _written_on("mps"),
        f"step-0000000046.safetensors was written on a mps device and this run now trains on {HERE}: its random "
        "states only fit the device they came from, so resume it where it ran",
    ),
    "progress-running-loss-missing": (
        _mid_epoch(torch.randperm(1438), None),
        "state of this run (the epoch's running loss is missing)",
    ),
    "train-out-onto-a-stopped-run": (_fresh_run_into, "already holds a run"),
    "finished-run": (lambda run, tmp, c: ["train", "--resume", run], "finished its 2 epochs"),
    "fewer-epochs": (lambda run, tmp, c: ["train", "--resume", run, "--epochs", "1"], "already trained 2 epochs"),
    "with-lr": (lambda run, tmp, c: ["train", "--resume", run, "--lr", "0.1"], "train.lr"),
    "with-set": (lambda run, tmp, c: ["train", "--resume", run, "--set", "model.latent=3"], "model.latent"),
    "with-out": (lambda run, tmp, c: ["train", "--resume", run, "--out", tmp / "x"], "--out"),
    "with-preset": (lambda run, tmp, c: ["train", "--resume", run, "--preset", "digits"], "--preset"),
    "not-a-run": (_plain_dir, "plain"),
    "missing": (lambda run, tmp, c: ["train", "--resume", tmp / "nope"], "nope"),
    "file-outside-checkpoints": (_loose, "not a checkpoint"),
    "other-architecture": (_foreign, "step-0000000099.safetensors"),
}


@pytest.mark.parametrize("case", RESUME_ERRORS)
def test_resume_errors_are_one_line_and_change_nothing(finished_run, other_architecture, tmp_path, capsys, case):
    """Resuming what cannot be resumed exits 2 with one line on stderr and leaves the run as it was."""
    run = _copy(finished_run, tmp_path)
    build, expected = RESUME_ERRORS[case]
    argv = build(run, tmp_path, other_architecture)
    before = snapshot(run)
    code, err = cli(argv, capsys)
    line = one_error_line(code, err)
    assert expected in line, line
    assert snapshot(run) == before
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- damaged checkpoints


def test_a_checkpoint_holding_nan_is_refused_as_damaged(finished_run, tmp_path, capsys):
    """Training never keeps a non-finite update, so NaN in a checkpoint is damage: refused before any training."""
    from safetensors.torch import save_file

    run = shutil.copytree(finished_run, tmp_path / "run")
    newest_file = sorted((run / "checkpoints").glob("*.safetensors"))[-1]
    with safe_open(str(newest_file), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    tensors[name][0, 0] = math.nan
    save_file(tensors, newest_file, metadata=meta)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--no-plots", "-q"]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and name in err, err
    assert snapshot(run) == before


def test_a_temporary_checkpoint_left_by_a_kill_goes_at_the_next_checkpoint(digits, tmp_path):
    """A process killed while writing a checkpoint leaves its temporary file: the next checkpoint removes it."""
    run = vaekit.train("digits", tmp_path / "run", epochs=1, **quiet(dataset=digits))
    stale = run.dir / "checkpoints" / ".step-0000000030.tmp.safetensors"
    stale.write_bytes(b"half a checkpoint")
    vaekit.resume(run.dir, epochs=2, dataset=digits, verbose=False)
    assert not stale.exists() and (run.dir / "checkpoints" / "step-0000000046.safetensors").exists()

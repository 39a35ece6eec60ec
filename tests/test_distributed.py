"""Several processes training together (torchrun, DistributedDataParallel over gloo on this CPU): the same updates
as one process, one run directory, exact resuming after SIGKILL, SIGTERM to one process, other process counts.

Every run is real training on scikit-learn's digits (1438 training examples, 23 steps per epoch at batch 64), in
real processes started as a user starts them: `torchrun` (as `python -m torch.distributed.run`), or, where a test
must signal one process of several, the two processes with the environment torchrun would give them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.datasets import load_digits

pytestmark = pytest.mark.heavy

EPOCHS = 4
TRAIN = ["train", "--epochs", str(EPOCHS), "--no-plots", "--no-report", "-q", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Two processes sum each batch's gradient in two parts and add the parts: float32 rounding differs from one sum in
# the last bits, and four epochs of Adam carry such differences up to about 1e-6 of a loss.
RTOL = 1e-5


def vaekit(args: list[str | Path], processes: int = 1, cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start `vaekit ARGS` in the background, as one process or under torchrun as several."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] if processes > 1 else []
    return subprocess.Popen(
        [sys.executable, *launch, "-m", "vaekit", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    """Wait for a process; its exit code, stdout and stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        raise
    return proc.returncode, out, err


def kill_all(proc: subprocess.Popen[str]) -> None:
    """SIGKILL to a process and to every process it started (torchrun starts each worker in a session of its own)."""
    family, found = {proc.pid}, True
    while found:
        found = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, ppid = int(stat.parent.name), int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid in family and pid not in family:
                family.add(pid)
                found = True
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()


def succeed(proc: subprocess.Popen[str]) -> str:
    """The output of a process that must exit 0."""
    code, out, err = finish(proc)
    assert code == 0, f"exit {code}:\n{err}"
    return out


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> bool:
    """Poll until ready() is true (True) or the process has ended (False)."""
    while proc.poll() is None:
        if ready():
            return True
        time.sleep(0.002)
    return False


def checkpoints(run: Path) -> list[str]:
    """The names of a run's checkpoint files, oldest first."""
    folder = run / "checkpoints"
    return sorted(p.name for p in folder.glob("step-*.safetensors")) if folder.is_dir() else []


def losses(run: Path) -> list[dict[str, float]]:
    """Each epoch's losses, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k.endswith("loss")} for row in rows]


def assert_close(a: list[dict[str, float]], b: list[dict[str, float]], rtol: float) -> None:
    assert [set(r) for r in a] == [set(r) for r in b] and len(a) == EPOCHS
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            assert abs(ra[k] - rb[k]) <= rtol * abs(rb[k]), (k, ra[k], rb[k])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same run made by one process and by two (started in a fresh folder, without --out), side by side."""
    base = tmp_path_factory.mktemp("uninterrupted")
    for n in (1, 2):
        (base / str(n)).mkdir()
    procs = {n: vaekit(TRAIN, n, cwd=base / str(n)) for n in (1, 2)}
    outs = {n: succeed(p) for n, p in procs.items()}
    runs = {}
    for n in (1, 2):
        made = list((base / str(n) / "runs").iterdir())
        assert len(made) == 1, f"{n} processes made {made}"  # one run directory, chosen once
        runs[n] = made[0]
        assert outs[n].strip() == str(Path("runs") / made[0].name)  # said once, by the main process
    return runs


def test_two_processes_make_the_updates_of_one_and_write_the_run_once(uninterrupted):
    """Two processes, each computing its half of every batch of 64, train to the per-epoch losses of one process
    within float tolerance, and their run directory holds what one process's holds, each file written once."""
    one, two = uninterrupted[1], uninterrupted[2]
    assert_close(losses(two), losses(one), RTOL)
    # The first epoch's train loss is summed from the same draws on the same weights before any update differs.
    assert losses(two)[0]["train_loss"] == pytest.approx(losses(one)[0]["train_loss"], rel=1e-7)
    files = {p.relative_to(one).as_posix() for p in one.rglob("*")}
    assert files == {p.relative_to(two).as_posix() for p in two.rglob("*")}
    assert checkpoints(two) == checkpoints(one)
    assert len((two / "metrics.jsonl").read_text().splitlines()) == EPOCHS


def test_a_two_process_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(uninterrupted, tmp_path):
    """torchrun and both processes killed with SIGKILL mid-run; resumed under two processes, the run ends with the
    uninterrupted two-process run's weights and losses, bit for bit."""
    run = tmp_path / "killed"
    proc = vaekit([*TRAIN, "--out", run, "--set", "train.checkpoint_every=5"], 2)
    # In its second epoch: the newest checkpoints are mid-epoch ones.
    assert wait_for(proc, lambda: any(name > "step-0000000030" for name in checkpoints(run))), finish(proc)
    kill_all(proc)
    assert not (run / "metrics.jsonl").exists() or len(losses(run)) < EPOCHS
    out = succeed(vaekit(["train", "--resume", run, "--no-plots", "--no-report", "-q"], 2))
    assert out.strip() == str(run)
    done = uninterrupted[2]
    assert (run / "model.safetensors").read_bytes() == (done / "model.safetensors").read_bytes()
    assert losses(run) == losses(done)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(args: list[str | Path]) -> list[subprocess.Popen[str]]:
    """`vaekit ARGS` as the two processes torchrun would start, without torchrun: each can be signalled alone."""
    port, procs = free_port(), []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "vaekit", *map(str, args)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))  # fmt: skip
    return procs


def test_sigterm_to_one_process_stops_both_with_a_checkpoint_that_one_process_resumes(uninterrupted, tmp_path):
    """SIGTERM to the second of two processes (as a scheduler may send it) stops both after a checkpoint, each with
    exit code 143; one process then resumes the two-process checkpoint and ends near the two-process run."""
    run = tmp_path / "stopped"
    procs = two_processes([*TRAIN, "--out", run])
    assert wait_for(procs[1], lambda: bool(checkpoints(run))), finish(procs[1])
    procs[1].send_signal(signal.SIGTERM)
    results = [finish(p) for p in procs]
    assert [code for code, _, _ in results] == [143, 143], [err for _, _, err in results]
    saved = checkpoints(run)
    assert 1 <= len(losses(run)) < EPOCHS and saved
    main_err = results[0][2].strip()
    assert main_err.startswith("vaekit: SIGTERM: training stopped") and f"saved {run / 'checkpoints' / saved[-1]}" in (
        main_err
    )
    out = succeed(vaekit(["train", "--resume", run, "--no-plots", "--no-report", "-q"]))
    assert out.strip() == str(run)
    # The same batches and noise, summed in one part instead of two: equal but for float rounding.
    assert_close(losses(run), losses(uninterrupted[2]), RTOL)
    a, b = load_file(run / "model.safetensors"), load_file(uninterrupted[2] / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


def test_sigterm_during_an_epochs_end_stops_both_after_that_epoch(tmp_path):
    """SIGTERM to the second of two processes while the end of an epoch is evaluated (here a test split of 72,000
    examples) stops both after that epoch, with its checkpoint, not somewhere in the next one."""
    images = np.array(load_digits().images, dtype=np.float32)[:, None] / 16
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=images[:1438], x_test=np.tile(images[1438:], (200, 1, 1, 1)))
    run, steps = tmp_path / "run", -(-1438 // 64)
    last_step = run / "checkpoints" / f"step-{steps:010d}.safetensors"  # written at epoch 1's last step
    procs = two_processes([*TRAIN, "--epochs", "3", "--data", data, "--set", f"train.checkpoint_every={steps}",
                           "--out", run])  # fmt: skip
    # Both processes agreed on the signals at that step before the file was written; the test split takes far longer
    # than 5 ms to evaluate.
    assert wait_for(procs[1], last_step.exists), finish(procs[1])
    time.sleep(0.005)
    procs[1].send_signal(signal.SIGTERM)
    results = [finish(p) for p in procs]
    assert [code for code, _, _ in results] == [143, 143], [err for _, _, err in results]
    assert results[0][2] == (
        f"vaekit: SIGTERM: training stopped after epoch 1 and saved {last_step}; continue with: vaekit train --resume"
        f" {run}\n"
    )
    assert len(losses(run)) == 1 and checkpoints(run) == [last_step.name]


def test_a_mistake_stops_every_process_with_one_line_each(uninterrupted):
    """--out naming a run that exists: the main process says so and the other that it stops with it, each in one
    line with exit code 2 (no traceback), and nothing in the run changes."""
    run = uninterrupted[2]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    results = [finish(p) for p in two_processes([*TRAIN, "--out", run])]
    assert [(code, out, err) for code, out, err in results] == [
        (2, "", f"vaekit: error: {run} already holds a run; pass another --out, or continue it with --resume {run}\n"),
        (2, "", "vaekit: error: another process of this run stopped (its message says why), so this one stops\n"),
    ]  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before

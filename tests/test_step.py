"""The training step: the guard that skips non-finite updates on the device, flags read every few steps, bf16
autocast with the ELBO in float32, and the compiled step (torch.compile on the CPU; CUDA graphs where a GPU is)."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import sys
import unittest.mock

import conftest
import pytest
import torch
from test_resume import DIVERGES, _with_train_x, assert_same_run, quiet

import vaekit
from vaekit.config import make_config
from vaekit.model import VAE, log_weights, objective
from vaekit.optim import make_optimizer
from vaekit.step import WINDOW, Step, compile_reason
from vaekit.world import Part

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_CXX = bool(os.environ.get("CXX") and shutil.which(os.environ["CXX"])) or bool(shutil.which("g++"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="torch.compile on a CPU needs a C++ compiler (g++ or $CXX)")


def _model_and_step(**train):
    cfg = make_config("digits", overrides={f"train.{k}": v for k, v in train.items()})
    torch.manual_seed(0)
    model = VAE((1, 8, 8), cfg.model)
    optimizer, _ = make_optimizer(cfg.train, model, torch.device("cpu"))
    return model, optimizer, Step(cfg, model, optimizer, steps=100)


OPTIMIZERS = {
    "Adam": ({"optimizer": "Adam"}, True),  # fused on a CPU: it skips by itself, the flags are read every WINDOW
    "AdamW": ({"optimizer": "AdamW"}, True),
    "SGD": ({"optimizer": "SGD", "optimizer_args": {"momentum": 0.9, "fused": True}}, False),  # held back on the host
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("first", [True, False], ids=["bad-first-step", "bad-later-step"])
def test_a_non_finite_step_changes_nothing(digits, name, first):
    """A batch with a NaN makes no update, as the first step or a later one: afterwards parameters and optimizer
    state (moments, momentum buffers, step counts) are exactly those of a twin that never saw the bad batch."""
    settings, on_device = OPTIMIZERS[name]
    model, optimizer, step = _model_and_step(**settings)
    assert step.on_device == on_device and step.window == (WINDOW if on_device else 1)
    x = digits.split("train").x[:64]
    bad = x.clone()
    bad[3, 0, 2, 2] = math.nan
    if not first:
        torch.manual_seed(1)
        step(x, 1.0)
    twin_model, twin_opt = copy.deepcopy((model, optimizer))  # one copy: the optimizer holds its parameters
    twin = Step(make_config("digits", overrides={f"train.{k}": v for k, v in settings.items()}), twin_model, twin_opt,
                steps=100)  # fmt: skip
    loss, made = step(bad, 1.0)
    assert not made and not torch.isfinite(loss)
    for (key, a), b in zip(model.state_dict().items(), twin_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    for seed in (2, 3):  # two finite steps: a momentum buffer left uninitialised would show in the second
        torch.manual_seed(seed)
        _, made = step(x, 1.0)
        torch.manual_seed(seed)
        twin(x, 1.0)
        assert made
    for (key, a), b in zip(model.state_dict().items(), twin_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    mine, theirs = optimizer.state_dict()["state"], twin_opt.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for key in mine:
        for item, value in mine[key].items():
            assert torch.equal(value, theirs[key][item]), (key, item)


def test_reading_the_flags_every_window_stops_where_reading_every_step_does(digits, tmp_path):
    """A diverging run stops with the same message (epoch, step, last good checkpoint) and the same skip counts
    whether the flags are read every WINDOW steps (fused Adam skips on the device) or after every step (an optimizer
    that is not fused, whose step the loop must hold back)."""
    settings = {**DIVERGES, "checkpoint_every": 0, "skip_limit": 30}
    messages, skipped = [], []
    for fused in (True, False):
        args = {**settings, "optimizer_args": {"fused": fused}}
        with pytest.raises(vaekit.VaekitError, match="not finite in 30 steps in a row") as e:
            vaekit.train("digits", tmp_path / f"fused-{fused}", epochs=4, **quiet(dataset=digits, **args))
        messages.append(str(e.value).replace(f"fused-{fused}", "RUN"))
        skipped.append([r["skipped"] for r in vaekit.read_metrics(tmp_path / f"fused-{fused}")])
    assert messages[0] == messages[1]
    assert f"epoch 4, step {30 - 22}" in messages[0]  # 22 skipped steps end epoch 3
    assert skipped[0] == skipped[1] == [0, 0, 22]


def test_a_nan_example_is_counted_the_same_with_a_window_spanning_checkpoints(digits, tmp_path, capsys):
    """Reading the flags late changes nothing a user sees: with checkpoints only at epoch ends (so the flags are
    read at the window's and the epoch's end), one NaN example per epoch is one skipped update per epoch, reported
    once each, and the run resumes exactly."""
    x = digits.split("train").x.clone()
    x[100] = math.nan
    data = _with_train_x(digits, x)
    capsys.readouterr()
    run = vaekit.train("digits", tmp_path / "run", epochs=3, dataset=data, checkpoint_every=0, verbose=True)
    assert [r["skipped"] for r in run.metrics] == [1, 1, 1]
    assert capsys.readouterr().err.count("non-finite loss or gradient, update skipped") == 3
    part = vaekit.train("digits", tmp_path / "part", epochs=1, dataset=data, checkpoint_every=0, verbose=False)
    vaekit.resume(part.dir, epochs=3, dataset=data, verbose=False)
    assert_same_run(run.dir, part.dir)


def test_bf16_runs_the_networks_in_bfloat16_and_the_elbo_in_float32(digits):
    """Under bf16 autocast the networks' matrix products are bfloat16, while the log-weights (likelihood and KL)
    come out in float32 and agree with the float32 model's to within bfloat16's precision."""
    model, _, _ = _model_and_step()
    x = digits.split("train").x[:256]
    seen = []
    hook = model.decoder.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = log_weights(model, x, 4, generator=g)
    hook.remove()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = log_weights(model, x, 4, generator=g)
    assert seen == [torch.bfloat16] and low.dtype == torch.float32
    rel = ((low - full).abs() / full.abs()).max().item()
    assert 0 < rel < 0.02, rel  # bfloat16 has 8 significant bits: the results differ, but not by much


@pytest.mark.parametrize("device", conftest.DEVICES)
def test_a_bf16_step_runs_the_networks_in_bfloat16_on_every_device(device):
    """train.precision = bf16 makes a step run the encoder and decoder in bfloat16 wherever it trains, not in
    autocast's own default (float16 on a GPU), and still sum the loss in float32."""
    cfg = make_config("digits", overrides={"train.precision": "bf16", "train.compile": "off"})
    model = VAE((1, 8, 8), cfg.model).to(device)
    optimizer, _ = make_optimizer(cfg.train, model, torch.device(device))
    step = Step(cfg, model, optimizer, steps=10, say=lambda line: None)
    seen = []
    for net in (model.encoder, model.decoder):
        net.register_forward_hook(lambda m, i, out: seen.append(out[0].dtype if isinstance(out, tuple) else out.dtype))
    loss, made = step(torch.rand(64, 1, 8, 8, device=device), 1.0)
    assert seen == [torch.bfloat16, torch.bfloat16] and loss.dtype == torch.float32 and bool(made)


def test_bf16_training_reaches_the_float32_loss(digits, tmp_path):
    """train.precision = bf16 trains the digits model to within 2% of the float32 test loss."""
    losses = {}
    for precision in ("fp32", "bf16"):
        run = vaekit.train("digits", tmp_path / precision, epochs=15, precision=precision, **quiet(dataset=digits))
        losses[precision] = run.metrics[-1]["test_loss"]
    assert losses["bf16"] != losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.02, losses


@pytest.mark.heavy
def test_precision_is_part_of_a_runs_identity_and_compile_is_not(digits, tmp_path):
    """A run resumes with another train.compile (the same updates), but not with another train.precision."""
    run = vaekit.train("digits", tmp_path / "run", epochs=1, compile="off", **quiet(dataset=digits))
    (run.dir / "config.toml").write_text(run.config.to_toml().replace('compile = "off"', 'compile = "on"'))
    vaekit.resume(run.dir, epochs=2, dataset=digits, verbose=False)
    (run.dir / "config.toml").write_text(run.config.to_toml().replace('precision = "fp32"', 'precision = "bf16"'))
    with pytest.raises(vaekit.VaekitError, match="precision"):
        vaekit.resume(run.dir, epochs=3, dataset=digits, verbose=False)


def test_compile_reasons():
    """train.compile = auto compiles runs of 50,000 steps or more; warm-up, MPS and several processes fall back to
    eager, saying why."""
    cfg = make_config("digits")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "50000 steps or more, and this one has 49999" in compile_reason(cfg, cpu, 49_999)
    assert "50000 steps or more" in compile_reason(cfg, cuda, 100)
    assert compile_reason(cfg, cuda, 10**6) == compile_reason(cfg, cpu, 50_000) == ""
    assert compile_reason(make_config("digits", overrides={"train.compile": "on"}), cpu, 1) == ""
    assert "off" in compile_reason(make_config("digits", overrides={"train.compile": "off"}), cuda, 10**6)
    warm = make_config("digits", overrides={"train.compile": "on", "train.warmup": 2})
    assert "warm-up" in compile_reason(warm, cpu, 10**6)
    on = make_config("digits", overrides={"train.compile": "on"})
    assert compile_reason(on, torch.device("mps"), 1) == "torch.compile does not support MPS"
    assert compile_reason(on, cpu, 10**6, processes=2) == (
        "each of several processes computes a share of every batch whose size varies from batch to batch"
    )
    assert compile_reason(on, cpu, 10**6, processes=1) == ""


DEVICES = [
    pytest.param("cpu", marks=needs_cxx),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_the_compiled_step_trains_like_the_eager_one_and_resumes_exactly(digits, tmp_path, capsys, device):
    """train.compile = on compiles the step with torch.compile (CUDA graphs on a GPU): it says so, reaches the eager
    test loss within noise, and a compiled run stopped after an epoch and resumed ends bit for bit as an
    uninterrupted one."""
    mode = "reduce-overhead" if device == "cuda" else "default"
    capsys.readouterr()
    compiled = {"dataset": digits, "compile": "on", "checkpoint_every": 5, "device": device}
    full = vaekit.train("digits", tmp_path / "full", epochs=3, **compiled)
    assert f"step compiled ({mode})" in capsys.readouterr().out
    eager = vaekit.train("digits", tmp_path / "eager", epochs=3, compile="off", device=device, **quiet(dataset=digits))
    assert full.metrics[-1]["test_loss"] != eager.metrics[-1]["test_loss"]  # inductor draws its own noise
    assert abs(full.metrics[-1]["test_loss"] - eager.metrics[-1]["test_loss"]) < 0.5
    part = vaekit.train("digits", tmp_path / "part", epochs=1, verbose=False, **compiled)
    vaekit.resume(part.dir, epochs=3, dataset=digits, verbose=False)
    assert_same_run(full.dir, part.dir)


@pytest.mark.heavy
@needs_cxx
def test_the_compiled_objective_has_the_eager_gradient_through_every_custom_function():
    """torch.compile (drawing the eager noise) gives a tanh network's objective the gradient the eager one has: the
    hand-written tanh and Bernoulli Functions compile correctly. With an in-place op in the tanh's forward, torch 2.11
    sent every gradient below it to the wrong place (pytorch/pytorch#180642)."""
    import torch._inductor.config as inductor

    cfg = make_config("iwae-1l")
    torch.manual_seed(0)
    model = VAE((1, 28, 28), cfg.model)
    x = torch.bernoulli(torch.full((20, 1, 28, 28), 0.3))

    def summed(x: torch.Tensor) -> torch.Tensor:
        return objective(model, x, "elbo", 1, 1.0, 0.0).sum()

    grads = []
    with unittest.mock.patch.object(inductor, "fallback_random", True):
        for f in (summed, torch.compile(summed, dynamic=False)):
            torch.manual_seed(1)
            model.zero_grad(set_to_none=True)
            f(x).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5 * eager.abs().max().item())


@pytest.mark.heavy
def test_a_failed_compile_falls_back_to_eager_with_one_line(tmp_path):
    """Without a working C++ compiler torch.compile fails on a CPU: training says why in one line and goes on
    eagerly to the end."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "vaekit", "train", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-plots"]
    cmd += ["--device", "cpu"]  # on a GPU torch.compile generates Triton code, which needs no C++ compiler
    done = subprocess.run([*cmd, "--set", "train.compile=on"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert lines == [lines[0]] and lines[0].startswith("step eager (torch.compile failed:"), done.stdout
    assert "Traceback" not in done.stderr
    assert len(vaekit.read_metrics(tmp_path / "run")) == 1


def _failing(message: str):
    """A stand-in for a compiled objective that fails as torch.compile does without a compiler: before any update."""

    def objective(x: torch.Tensor, beta: float, part: object = None) -> torch.Tensor:
        raise RuntimeError(message)

    return objective


@pytest.mark.parametrize(
    ("message", "detail"), [("no C++ compiler\nat line 2", "no C++ compiler"), ("", "RuntimeError")]
)
def test_a_compiled_step_that_fails_is_redone_eagerly_and_says_why_in_one_line(digits, message, detail):
    """A failing compiled objective falls back to the eager one for this step and the next: the update is the eager
    step's exactly, and the step says once why it runs eagerly, in the first line of the error (or its type)."""
    said = []
    model, optimizer, step = _model_and_step(compile="on")
    twin_model, twin_optimizer, twin = _model_and_step(compile="off")
    step.say = said.append
    step.objective = _failing(message)
    assert step.compiled
    x = digits.split("train").x[:64]
    part = Part(torch.arange(0, 64, 2), 64)  # a part of a batch, as each of several processes has: redone as a part
    for i in range(2):
        torch.manual_seed(i)  # the posterior draws come from the global generator
        loss, made = step(x[part.rows], 1.0, part)
        torch.manual_seed(i)
        twin_loss, twin_made = twin(x[part.rows], 1.0, part)
        assert torch.equal(loss, twin_loss) and bool(made) and bool(twin_made)
    assert not step.compiled and said == [f"step eager (torch.compile failed: {detail})"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))


def test_an_eager_step_that_fails_raises():
    """Only a compiled step falls back: an error in the eager objective is the caller's."""
    _, _, step = _model_and_step(compile="off")
    step.objective = step.eager = _failing("a real bug")
    assert not step.compiled
    with pytest.raises(RuntimeError, match="a real bug"):
        step(torch.zeros(4, 1, 8, 8), 1.0)


BF16_ON_CPU = "train.precision = bf16 on a CPU: without bfloat16 units (most CPUs) it is slower than fp32"


def test_the_step_says_how_it_runs_only_when_that_is_news(digits):
    """Under train.compile = auto a short run trains eagerly without a word, and a long one that cannot be compiled
    says why; set to off it says so after its first step, once; bf16 on a CPU warns before the first step that it is
    slower there."""
    x = digits.split("train").x[:64]
    for train, steps, expected in (
        ({}, 100, []),
        ({"warmup": 2}, 50_000, ["step eager (the KL warm-up (train.warmup) changes the objective at every step)"]),
        ({"compile": "off"}, 100, ["step eager (train.compile is off)"]),
        ({"compile": "off", "precision": "bf16"}, 100, [BF16_ON_CPU, "step eager (train.compile is off)"]),
    ):
        cfg = make_config("digits", overrides={f"train.{k}": v for k, v in train.items()})
        model = VAE((1, 8, 8), cfg.model)
        optimizer, _ = make_optimizer(cfg.train, model, torch.device("cpu"))
        said: list[str] = []
        step = Step(cfg, model, optimizer, steps=steps, say=said.append)
        step(x, 1.0)
        step(x, 1.0)
        assert said == expected


def test_the_step_is_told_the_runs_total_steps_also_when_resumed(digits, tmp_path, monkeypatch):
    """train.compile = auto decides by the steps of the whole run, its epochs times the steps of one: a run resumed
    for three epochs is told what an uninterrupted three-epoch run is, so that it takes the same path."""
    told = []

    class Told(Step):
        def __init__(self, cfg, model, optimizer, steps, say=print, world=None):
            told.append(steps)
            super().__init__(cfg, model, optimizer, steps, say, world)

    monkeypatch.setattr("vaekit.training.Step", Told)
    run = vaekit.train("digits", tmp_path / "run", epochs=1, dataset=digits, verbose=False)
    vaekit.resume(run.dir, epochs=3, dataset=digits, verbose=False)
    steps = math.ceil(len(digits.split("train").x) / 64)
    assert told == [steps, 3 * steps]


def test_a_step_on_a_part_of_a_batch_computes_those_rows_of_the_whole_batch(digits):
    """Given its part of a global batch (as each of several processes is), a step returns the loss of those rows of
    the whole batch, with the draws the whole batch would get."""
    t = make_config("digits").train
    x = digits.split("train").x[:16]
    rows = torch.tensor([2, 5, 6, 11])
    model, _, step = _model_and_step()
    torch.manual_seed(4)
    whole = objective(model, x, t.objective, t.k, 1.0, t.free_bits)
    torch.manual_seed(4)
    loss, made = step(x[rows], 1.0, Part(rows, len(x)))
    assert made
    torch.testing.assert_close(loss, whole[rows].sum())


def test_the_module_that_several_processes_wrap_computes_the_objective_of_their_part(digits):
    """The summed objective as a module, which DistributedDataParallel wraps, computes what the step's objective does
    for the same part of a batch and the same KL weight."""
    from vaekit.step import _Summed

    model, _, step = _model_and_step()
    x, rows = digits.split("train").x[:16], torch.tensor([1, 2, 9])
    module = _Summed(model, step.eager)
    assert list(module.parameters()) == list(model.parameters())
    for beta in (0.3, 1.0):
        torch.manual_seed(5)
        expected = step.eager(x[rows], beta, Part(rows, len(x)))
        torch.manual_seed(5)
        assert torch.equal(module(x[rows], beta, Part(rows, len(x))), expected)

"""The training step: one update of the model on one batch, run eagerly or through torch.compile, with its
non-finite guard kept on the device so that a step need not wait for the device to finish the one before.

The same `Step` serves every device. On a GPU, `torch.compile(mode="reduce-overhead")` replays the step's kernels as
CUDA graphs; on a CPU it fuses the element-wise work in generated C++. Either way fused Adam and AdamW skip an update
whose loss or gradient is not finite by themselves (`found_inf`), and the loop reads the finite flags only every
`window` steps; other optimizers have their step held back here, flag by flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import Config
from .errors import first_line
from .model import VAE, objective
from .world import Part, World

# A run with fewer steps than this trains eagerly under train.compile = "auto": compiling the step takes from seconds
# to a minute, which a short run does not win back (on two CPU cores the compiled step saved 15 to 22% of 3 to 5 ms
# after 5 to 20 s of compiling).
AUTO_COMPILE_STEPS = 50_000
# Steps between reads of the finite flags when the optimizer skips by itself: a read waits for the device to finish.
WINDOW = 50


def finite(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether the loss and every gradient are finite, as a boolean tensor on their device (read without a sync)."""
    # A sum is finite exactly when all its terms are (or it overflows, which no sane update does); sums cost half of
    # what norms do on a CPU.
    sums = torch.stack([p.grad.sum() for p in params if p.grad is not None])
    return torch.isfinite(loss.detach() + sums.sum())


def compile_reason(cfg: Config, device: torch.device, steps: int, processes: int = 1) -> str:
    """Why the step runs eagerly, or "" when it is compiled, for train.compile and a run of `steps` steps in all (not
    those left: a resumed run must take the path the uninterrupted one took)."""
    t = cfg.train
    if t.compile == "off":
        return "train.compile is off"
    if t.compile == "auto" and steps < AUTO_COMPILE_STEPS:
        return f"train.compile = auto compiles runs of {AUTO_COMPILE_STEPS} steps or more, and this one has {steps}"
    if t.warmup:
        return "the KL warm-up (train.warmup) changes the objective at every step"
    if device.type == "mps":
        return "torch.compile does not support MPS"
    if processes > 1:
        return "each of several processes computes a share of every batch whose size varies from batch to batch"
    return ""


class _Summed(torch.nn.Module):
    """The summed objective as a module of the model's parameters, for DistributedDataParallel to wrap."""

    def __init__(self, model: VAE, summed: Callable[[torch.Tensor, float, Part | None], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.summed = model, summed

    def forward(self, x: torch.Tensor, beta: float, part: Part | None) -> torch.Tensor:
        return self.summed(x, beta, part)


class Step:
    """One update: objective, gradients, finite check, clipping and the optimizer's step, eager or compiled; under
    several processes, each computes its part of the batch and DistributedDataParallel sums their gradients."""

    def __init__(
        self,
        cfg: Config,
        model: VAE,
        optimizer: torch.optim.Optimizer,
        steps: int,
        say: Callable[[str], Any] = print,
        world: World | None = None,
    ) -> None:
        t, device = cfg.train, model.device
        self.model, self.optimizer, self.clip = model, optimizer, t.clip_grad
        self.world = world = world or World()
        self.params = list(model.parameters())
        self.reason = compile_reason(cfg, device, steps, world.size)
        # How the step runs is said after the first one (when a compile has worked or failed), unless it is the usual:
        # a short run under auto, eager.
        usual = t.compile == "auto" and steps < AUTO_COMPILE_STEPS
        self.say = (lambda line: None) if usual else say
        if t.precision == "bf16" and device.type == "cpu":
            say("train.precision = bf16 on a CPU: without bfloat16 units (most CPUs) it is slower than fp32")
        self.mode = "reduce-overhead" if device.type == "cuda" else "default"
        # Fused Adam and AdamW skip an update themselves when found_inf is set (parameters, moments and step count
        # untouched); other optimizers need the flag read at every step (fused SGD, for one, would leave its
        # momentum buffers uninitialised after a skipped first step).
        self.on_device = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(
            optimizer.defaults.get("fused")
        )
        # How many steps the loop may go without reading the finite flags: each read waits for the device.
        self.window = WINDOW if self.on_device else 1
        precision = (
            torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else contextlib.nullcontext()
        )

        def summed(x: torch.Tensor, beta: float, part: Part | None = None) -> torch.Tensor:
            with precision:
                return objective(model, x, t.objective, t.k, beta, t.free_bits, part=part).sum()

        self.tried = False  # whether a step has run and said how it runs
        self.eager: Callable[..., torch.Tensor] = summed
        if world.size > 1:
            # It averages the processes' gradients; each one's loss is scaled by their number to make that a sum.
            self.eager = torch.nn.parallel.DistributedDataParallel(
                _Summed(model, summed), device_ids=[device] if device.type == "cuda" else None
            )
        self.objective: Callable[..., torch.Tensor] = (
            self.eager if self.reason else torch.compile(summed, dynamic=False, mode=self.mode)
        )

    @property
    def compiled(self) -> bool:
        """Whether the objective and its gradient run through torch.compile."""
        return self.objective is not self.eager

    def __call__(self, x: torch.Tensor, beta: float, part: Part | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the model on the batch x (this process's part of it); returns the batch's summed loss and whether
        the update was made (both on the device: reading them waits for it)."""
        try:
            result = self._update(x, beta, part)
        except Exception as e:  # compiling fails without a C++ compiler, or on what torch.compile cannot trace
            if not self.compiled:
                raise
            # It fails before the optimizer's step (a new batch shape recompiles too): the step is redone eagerly.
            self.objective, self.reason = self.eager, f"torch.compile failed: {first_line(e)}"
            self.tried = False
            result = self._update(x, beta, part)
        if not self.tried:
            self.tried = True
            self.say(self.describe())
        return result

    def _update(self, x: torch.Tensor, beta: float, part: Part | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The update itself (see __call__); it fails, if at all, before the optimizer's step."""
        if self.compiled and self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer needed
        loss = self.objective(x, beta, part)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * self.world.size if self.world.size > 1 else loss).backward()
        # The whole batch's loss: a part's loss that is not finite stops every process's update.
        loss = self.world.sum(loss.detach())
        ok = finite(loss, self.params)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if self.on_device:
            # Read by the fused kernels on the device: they leave the parameters, moments and step count as they are.
            self.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
            self.optimizer.step()
        elif ok:
            self.optimizer.step()
        return loss.detach(), ok

    def describe(self) -> str:
        """How the step runs, in a few words."""
        return f"step compiled ({self.mode})" if self.compiled else f"step eager ({self.reason})"

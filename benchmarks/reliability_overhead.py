"""What the reliability machinery costs: seconds per epoch of `vaekit.train` against the same loop without it.

The bare loop is vaekit's own model, objective, optimizer and per-epoch evaluation and saving, but with no
non-finite check, no signal handling and no checkpoints. `vaekit.train` runs as users run it: the finite check on
every step, a checkpoint every `checkpoint_every` steps (default 1000) and at every epoch's end. Both run on the same
MNIST tensor, alternating, for the seed preset (batch 64, 938 steps/epoch) and Burda et al.'s iwae-1l architecture
(batch 20, 3000 steps/epoch, where per-step overhead matters most); the script prints median seconds per epoch and
the ratio.

    python benchmarks/reliability_overhead.py --data-dir ../shared/data [--epochs 2] [--rounds 2]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from common import arguments, mnist_copy

import vaekit
from vaekit.files import write_text
from vaekit.model import VAE, mean_loss, objective
from vaekit.optim import make_optimizer
from vaekit.run import METRICS, save_model


def bare(cfg: vaekit.Config, data: vaekit.Dataset, out: Path) -> list[float]:
    """The training loop with none of the reliability machinery; per-epoch seconds."""
    torch.manual_seed(cfg.train.seed)
    t, device = cfg.train, torch.device("cpu")
    x_train, x_test = data.split("train").x, data.split("test").x
    model = VAE(data.shape, cfg.model)
    optimizer, _ = make_optimizer(t, model, device)
    shuffle = torch.Generator().manual_seed(t.seed)
    n, bs = len(x_train), t.batch_size
    out.mkdir(parents=True)
    seconds, metrics = [], []
    for epoch in range(t.epochs):
        start = time.perf_counter()
        order = torch.randperm(n, generator=shuffle)
        total = torch.zeros(())
        for step in range((n + bs - 1) // bs):
            x = x_train[order[step * bs : (step + 1) * bs]]
            loss = objective(model, x, t.objective, t.k, t.beta, t.free_bits).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        metrics.append({"epoch": epoch + 1, "train_loss": total.item() / n, "test_loss": mean_loss(model, x_test)})
        save_model(model, out)
        write_text(out / METRICS, "".join(json.dumps(m) + "\n" for m in metrics))
        seconds.append(time.perf_counter() - start)
    return seconds


def full(cfg: vaekit.Config, data: vaekit.Dataset, out: Path) -> list[float]:
    """`vaekit.train` as users run it; per-epoch seconds from its metrics."""
    run = vaekit.train(cfg, out, dataset=data, verbose=False)
    return [m["seconds"] for m in run.metrics]


def main() -> None:
    """Run both loops alternately on both architectures and print the comparison."""
    a = arguments(__doc__, epochs=2)
    with mnist_copy(a.data_dir) as (tmp, root):
        for preset in ("seed", "iwae-1l"):
            cfg = vaekit.make_config(
                preset,
                overrides={
                    "data.root": str(root),
                    "data.binarize": False,  # the bare loop does not binarise; neither side should
                    "data.validation": 0,
                    "train.scheduler": "",
                    "train.epochs": a.epochs,
                    "train.device": "cpu",
                },
            )
            data = vaekit.load_data(cfg.data)
            times: dict[str, list[float]] = {"bare": [], "vaekit": []}
            for r in range(a.rounds):
                for name in ("bare", "vaekit") if r % 2 == 0 else ("vaekit", "bare"):
                    fn = bare if name == "bare" else full
                    times[name] += fn(cfg, data, tmp / f"{preset}-{name}-{r}")
                    print(f"  {preset:8s} round {r + 1} {name:7s} {statistics.median(times[name]):.3f} s/epoch")
            b, v = statistics.median(times["bare"]), statistics.median(times["vaekit"])
            steps = -(-len(data.split("train").x) // cfg.train.batch_size)
            print(
                f"{preset}: bare {b:.3f} s/epoch, vaekit {v:.3f} s/epoch, ratio {v / b:.3f} "
                f"({(v - b) / steps * 1e6:+.1f} us per step over {steps} steps)"
            )


if __name__ == "__main__":
    main()

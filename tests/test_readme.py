"""The README as a reference: every flag of every command and every configuration key is described in it."""

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import write_fake_mnist

from vaekit import Config
from vaekit.cli import _build, main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _flags(parser, name: str = "") -> list[tuple[str, str]]:
    """Every long option of every command, with the command it belongs to."""
    found = []
    for action in parser._actions:
        found += [(name or "vaekit", o) for o in action.option_strings if o.startswith("--") and o != "--help"]
        if isinstance(getattr(action, "choices", None), dict):
            for sub, subparser in action.choices.items():
                found += _flags(subparser, f"{name} {sub}".strip())
    return found


def test_every_flag_of_every_command_is_in_the_readme():
    flags = _flags(_build())
    assert len({command for command, _ in flags}) >= 14
    named = [f for f in flags if re.search(rf"(?<![\w-]){re.escape(f[1])}(?![\w-])", README)]
    assert not sorted(set(flags) - set(named)), "flags the README omits"


def test_every_configuration_key_is_in_the_readmes_configuration_file():
    cfg = Config()
    keys = [(s, f.name) for s in ("data", "model", "train") for f in dataclasses.fields(getattr(cfg, s))]
    table = README[README.index("## Configuration files") : README.index("## The run directory")]
    assert not [k for k in keys if not re.search(rf"^{k[1]}\s*=", table, re.M)], "keys the README omits"


# ---------------------------------------------------------------- every command and snippet, run as written

# What the README's commands are run on: data and files made here under the names the README uses. `~` is a home
# folder of the sandbox (VAEKIT_DATA points at ~/data too) and /mnt/ a folder in it; everything else is as written,
# but for the shortenings the README's Development section states: every `vaekit train` that starts a run gets
# --epochs 1 and every `vaekit evaluate` --limit 10 (last, so that they win).
SHORTEN = {"train": ["--epochs", "1"], "evaluate": ["--limit", "10"]}
FEW = ["--set", "data.validation=5000"]  # leaves 600 of the stand-in MNIST's 5,600 training images to train on
PLACEHOLDERS = {  # runs the README names by a timestamp, as `vaekit train` would have made them
    "runs/seed-20261124-101500": ["--preset", "seed", *FEW],
    "runs/iwae-1l-20261124-101500": ["--preset", "iwae-1l", *FEW],
    "runs/digits-20261124-101500": [],
}
SKIPPED = (
    "python3 -m venv",  # the quick start and the development set-up: what CI itself runs on a fresh clone
    ".venv/bin/",  # the development tools, the benchmarks and the test suite itself
    "VAEKIT_SLOW=1",
)


def _commands() -> list[tuple[str, str]]:
    """Every shell command and Python snippet in the README, in order, as (language, text)."""
    found = []
    for language, body in re.findall(r"```(\w+)\n(.*?)```", README, re.S):
        if language == "python":
            found.append(("python", body))
        elif language == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                command = re.split(r"\s{2,}#", line.strip())[0].strip()
                if command and not command.startswith("#"):
                    found.append(("bash", command))
    return found


def _cases(folder: Path, rng: np.random.Generator) -> None:
    """The files the README's commands and snippets read, made with the shapes its examples imply."""
    from PIL import Image
    from sklearn.datasets import load_breast_cancer

    data = folder / "home" / "data"
    write_fake_mnist(data, 0, train=5600, test=60)  # the README holds 5,000 of them out for validation
    for name, seed in (("FashionMNIST", 1), ("KMNIST", 2)):
        write_fake_mnist(data / "tmp", seed, train=600, test=100)
        (data / "tmp" / "MNIST").rename(data / name)
    write_fake_mnist(folder / "mnt" / "old" / "data" / "tmp", 3, train=600, test=100)
    (folder / "mnt" / "new").mkdir()
    (folder / "mnt" / "old" / "data" / "tmp" / "MNIST").rename(folder / "mnt" / "old" / "data" / "FashionMNIST")
    (data / "binarized_mnist").mkdir()
    for split, n in (("train", 600), ("valid", 200), ("test", 100)):
        rows = rng.integers(0, 2, (n, 784))
        (data / "binarized_mnist" / f"binarized_mnist_{split}.amat").write_text(
            "".join(" ".join(map(str, r)) + "\n" for r in rows)
        )
    for i in range(12):  # colour pictures of another size, in two classes
        (folder / "my_images" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(colour).save(folder / "my_images" / "ab"[i % 2] / f"{i}.png")
        (folder / "scans").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / "scans" / f"scan-{i}.png")
    np.savez(folder / "arrays.npz", x=rng.random((300, 28, 28), dtype=np.float32), y=rng.integers(0, 10, 300))
    np.save(folder / "new-digits.npy", rng.random((20, 1, 28, 28), dtype=np.float32))
    np.save(folder / "digits.npy", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8))
    toml = re.search(r"```toml\n(.*?)```", README, re.S)
    (folder / "my.toml").write_text(toml.group(1) if toml else "")
    cancer = load_breast_cancer()
    header = ",".join(n.replace(" ", "_") for n in cancer.feature_names) + ",diagnosis"
    labels = np.where(cancer.target == 1, "benign", "malignant")  # scikit-learn's target 1 is benign
    rows = [",".join(f"{v:.6g}" for v in x) + f",{label}" for x, label in zip(cancer.data, labels, strict=True)]
    benign = [r for r in rows if r.endswith("benign")]
    (folder / "benign.csv").write_text("\n".join([header, *benign[:300]]) + "\n")
    (folder / "benign-held-out.csv").write_text("\n".join([header, *benign[300:]]) + "\n")
    (folder / "new-cases.csv").write_text("\n".join([header, *rows[:40]]) + "\n")
    (folder / "labelled-cases.csv").write_text("\n".join([header, *rows]) + "\n")


def _argv(command: str, folder: Path) -> list[str]:
    """The arguments of a README command after its program, with ~ and /mnt/ in the sandbox, shortened."""
    argv = [os.path.expanduser(a).replace("/mnt/", f"{folder}/mnt/") for a in shlex.split(command)]
    return argv[1:] + ([] if "--resume" in argv or argv[0] != "vaekit" else SHORTEN.get(argv[1], []))


def test_every_command_and_snippet_of_the_readme_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README cannot drift from the code: each of its `vaekit` commands, shell steps and Python snippets runs,
    in order, in a folder holding the files they name (SHORTEN and the stand-ins above are the only changes)."""
    rng = np.random.default_rng(0)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("VAEKIT_DATA", str(home / "data"))
    monkeypatch.chdir(tmp_path)
    _cases(tmp_path, rng)
    for run, flags in PLACEHOLDERS.items():
        assert main(["train", *flags, "--epochs", "1", "--out", run, "--no-plots", "-q"]) == 0, run
    # The README continues the seed run as a stopped one: it was meant for 3 epochs and stopped after 1.
    config = tmp_path / "runs/seed-20261124-101500/config.toml"
    config.write_text(config.read_text().replace("epochs = 1\n", "epochs = 3\n"))
    ran = 0
    for language, text in _commands():
        if language == "python":
            namespace = {"X_normal": rng.random((200, 6)), "X": rng.random((50, 6))}  # the arrays a snippet names
            exec(compile(text, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
        elif text.startswith(SKIPPED):
            continue
        elif text.startswith("mv "):
            subprocess.run(["mv", *_argv(text, tmp_path)], check=True)
        elif text.startswith("torchrun "):  # as torchrun, which is `python -m torch.distributed.run`
            argv = _argv(text, tmp_path)
            at = argv.index("vaekit") + 1
            argv += SHORTEN.get(argv[at], [])
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv], env=env,
                                  capture_output=True, text=True)  # fmt: skip
            assert done.returncode == 0, (text, done.stderr[-500:])
        else:
            assert text.startswith("vaekit "), f"a README command this test does not know how to run: {text}"
            capsys.readouterr()
            code = main(_argv(text, tmp_path))
            assert code == 0, (text, capsys.readouterr().err[-500:])
        ran += 1
    assert ran >= 45

"""The run object and the public API: a run's files are named in one place, opening a run reads only what is used,
and the names that editors and type checkers see are the names `import vaekit` gives.
"""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli, write_fake_mnist

import vaekit
from vaekit.cli import main
from vaekit.run import ARTIFACTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_with_validation(tmp_path_factory: pytest.TempPathFactory) -> vaekit.Run:
    """A digits run of 2 epochs with a validation split, so that it also holds a best/ model, and TensorBoard logs."""
    out = tmp_path_factory.mktemp("run") / "run"
    return vaekit.train("digits", out, epochs=2, verbose=False, tensorboard=True, **{"data.validation": 100})


def test_every_file_the_commands_write_into_a_run_is_named_in_artifacts(run_with_validation, capsys):
    """Training, then every command with its default outputs, writes only files that the run's artifact table
    names, and every named file it was asked for exists (scaler.json only belongs to runs on tables)."""
    run = run_with_validation
    commands = [
        ["evaluate", "--k", "2"],
        ["evaluate", "--k", "2", "--split", "valid"],
        ["evaluate", "--k", "2", "--limit", "5"],
        ["sample", "-n", "4"],
        ["reconstruct", "-n", "4"],
        ["encode"],
        ["decode", str(run.path("latents"))],
        ["plot"],
        ["anomaly", "calibrate", "--k", "2"],
        ["anomaly", "report", "--normal", "0,1,2,3,4", "--k", "2"],
        ["compress", str(run.dir.parent / "binary.npy"), "-o", str(run.dir.parent / "binary.vkz"), "--report", "-q"],
        ["report"],
    ]
    # The digits run's Bernoulli model codes binary data only: its test split, made binary, is what it compresses.
    np.save(run.dir.parent / "binary.npy", (run.examples("test").x > 0.5).numpy())
    for command in commands:
        words = 2 if command[0] == "anomaly" else 1
        assert main([*command[:words], str(run.dir), *command[words:]]) == 0, capsys.readouterr().err
    capsys.readouterr()
    evaluations = [run.evaluation_path(), run.evaluation_path("valid"), run.evaluation_path("test", 5)]
    named = {run.path(name) for name in ARTIFACTS if "{" not in ARTIFACTS[name]}
    named |= set(evaluations) | {p.with_suffix(".npz") for p in evaluations}
    written = {p for p in run.dir.rglob("*") if p.is_file()}
    inside = {run.path(name) for name in ("checkpoints", "best", "anomaly-report", "tensorboard")}  # folders
    unnamed = sorted(p for p in written - named if not any(folder in p.parents for folder in inside))
    assert not unnamed, f"files not named in ARTIFACTS: {unnamed}"
    files = named - {run.path(name) for name in ("checkpoints", "best", "plots", "anomaly-report", "scaler",
                                                 "tensorboard")}  # fmt: skip
    assert not sorted(files - written), "named files that were not written"
    assert [p.name for p in evaluations] == ["evaluation.json", "evaluation-valid.json", "evaluation-first5.json"]
    # The run's record names every file in it, and names nothing else but checkpoints pruned since.
    recorded = {run.dir / line for line in run.path("record").read_text().splitlines()}
    assert not sorted(written - recorded - {run.path("record")}), "files the record does not name"
    assert all(p.parent == run.path("checkpoints") for p in recorded - written), sorted(recorded - written)


def test_open_run_reads_config_model_metrics_and_data_from_disk(run_with_validation):
    """A run opened from its path holds the same settings, weights, metrics and data as the one training returned."""
    trained = run_with_validation
    run = vaekit.open_run(trained.dir)
    assert vaekit.open_run(run) is run
    assert run.config == trained.config and run.config.data.validation == 100
    assert run.metrics == trained.metrics and len(run.metrics) == 2
    assert run.metrics == vaekit.read_metrics(trained.dir)
    state = trained.model.state_dict()
    assert all(torch.equal(v, state[k].cpu()) for k, v in run.model.state_dict().items())
    assert run.model.device.type == "cpu" and not run.model_on(torch.device("cpu")).training
    first = run.examples("valid", 5)
    assert torch.equal(first.x, trained.data.split("valid").x[:5])
    assert first.y is not None and torch.equal(first.y, trained.data.split("valid").y[:5])
    assert len(run.examples("test").x) == len(trained.data.split("test").x)


def test_a_run_refuses_examples_of_another_shape_and_names_what_is_unknown(run_with_validation, tmp_path):
    """Examples of another shape, an unknown split or artifact, a limit below 1, a missing folder and a folder that
    is not a run are refused by name; opening a folder reads nothing until something is asked of it."""
    run = vaekit.open_run(run_with_validation.dir)
    with pytest.raises(vaekit.VaekitError, match=r"shape \(1, 9, 9\), but the model was trained on \(1, 8, 8\)"):
        run.check_shape(torch.zeros(3, 1, 9, 9))
    run.check_shape(torch.zeros(3, 1, 8, 8))
    with pytest.raises(vaekit.VaekitError, match="no split 'nope'"):
        run.examples("nope")
    with pytest.raises(vaekit.VaekitError, match="at least 1"):
        run.examples("test", 0)
    with pytest.raises(KeyError, match="unknown run artifact 'nope'"):
        run.path("nope")
    with pytest.raises(vaekit.VaekitError, match="run directory not found"):
        vaekit.open_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    empty = vaekit.open_run(tmp_path / "empty")
    assert empty.path("weights") == tmp_path / "empty" / "model.safetensors"
    with pytest.raises(vaekit.VaekitError, match="is not a vaekit run: config.toml is missing"):
        _ = empty.config
    with pytest.raises(vaekit.VaekitError, match="is not a vaekit run: model.json is missing"):
        _ = empty.model


def test_resume_takes_a_run_and_keeps_its_data_in_memory(digits, tmp_path):
    """A Run that training returned resumes with the data it holds (here a subset given in memory, which its config
    does not name), and ends exactly where one longer run ends."""
    small = vaekit.Dataset("digits", {k: vaekit.Split(s.x[:200], s.y) for k, s in digits.splits.items()})
    short = vaekit.train("digits", tmp_path / "short", dataset=small, epochs=1, verbose=False)
    longer = vaekit.resume(short, epochs=2, verbose=False)
    whole = vaekit.train("digits", tmp_path / "whole", dataset=small, epochs=2, verbose=False)
    assert longer.dir == short.dir and len(longer.metrics) == 2
    assert (longer.dir / "model.safetensors").read_bytes() == (whole.dir / "model.safetensors").read_bytes()


def test_the_names_type_checkers_see_are_the_names_import_vaekit_gives():
    """The imports under TYPE_CHECKING in vaekit/__init__.py and its literal __all__ name exactly the lazily exported
    names, from the same modules, and each resolves to that module's object."""
    tree = ast.parse(Path(vaekit.__file__).read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {alias.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == vaekit._WHERE
    listed = next(n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "__all__")
    assert isinstance(listed, ast.List) and sorted(ast.literal_eval(listed)) == sorted(seen) == sorted(vaekit.__all__)
    for name, module in seen.items():
        assert getattr(vaekit, name) is getattr(importlib.import_module(f"vaekit.{module}"), name), name


def test_import_vaekit_does_not_load_torch():
    """`import vaekit` stays fast: torch is imported only when a name that needs it is used."""
    check = "import sys, vaekit; print('torch' in sys.modules); vaekit.VAE; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_files_a_user_put_in_a_run_are_never_replaced_or_removed(digits, tmp_path, capsys):
    """A file of the user's where a command would write its default output, or named like a checkpoint, is left as
    it is: the command is refused with one line and writes nothing, and pruning passes the file by."""
    run = vaekit.train("digits", tmp_path / "run", epochs=2, dataset=digits, verbose=False).dir
    mine = {run / "samples.png": b"my picture", run / "plots" / "loss.png": b"my plot",
            run / "checkpoints" / "step-00000001.safetensors": b"my checkpoint"}  # fmt: skip
    for path, data in mine.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    for command in (["sample", run, "-n", "4"], ["plot", run]):
        before = sorted(p for p in run.rglob("*") if p.is_file())
        code, _, err = run_cli(command, capsys)
        assert_one_line_error(code, err)
        assert "is not a file vaekit wrote" in err, err
        assert sorted(p for p in run.rglob("*") if p.is_file()) == before
    assert run_cli(["train", "--resume", run, "--epochs", "4", "--no-plots", "-q"], capsys)[0] == 0
    assert {path: path.read_bytes() for path in mine} == mine
    assert len(list((run / "checkpoints").glob("step-*.safetensors"))) == 1 + 2  # the user's and the newest two
    (run / "samples.png").unlink()
    assert run_cli(["sample", run, "-n", "4"], capsys)[0] == 0


def test_a_run_moved_with_its_data_is_evaluated_plotted_and_resumed_with_data_dir(tmp_path, capsys):
    """A run trained on MNIST archives in one folder, moved with them to another, works there with --data-dir; it
    says so when the data are not found, and refuses other data (a look-alike set of the same size) by name."""
    first = write_fake_mnist(tmp_path / "first")
    train = ["train", "--data", "mnist", "--data-dir", first, "--no-download", "--epochs", "1", "--no-plots", "-q"]
    assert run_cli([*train, "--out", first / "run"], capsys)[0] == 0
    moved = tmp_path / "moved"
    first.rename(moved)
    run = moved / "run"
    code, _, err = run_cli(["evaluate", run, "--k", "2"], capsys)
    assert_one_line_error(code, err)
    assert "--data-dir" in err, err
    for command in (["evaluate", run, "--k", "2"], ["plot", run], ["reconstruct", run, "-n", "4"], ["encode", run],
                    ["train", "--resume", run, "--epochs", "2", "--no-plots", "-q"]):  # fmt: skip
        code, _, err = run_cli([*command, "--data-dir", moved], capsys)
        assert code == 0, (command, err)
    assert vaekit.open_run(run).config.data.root == str(moved.resolve())  # the resumed run records where they are
    other = write_fake_mnist(tmp_path / "other", seed=1)
    for command in (["evaluate", run, "--k", "2"], ["train", "--resume", run, "--epochs", "3", "-q"]):
        code, _, err = run_cli([*command, "--data-dir", other], capsys)
        assert_one_line_error(code, err)
        assert "MNIST" in err or "mnist" in err, err


def test_data_passed_in_memory_are_recorded_as_such_and_asked_for(digits, tmp_path):
    """A run trained on data given in memory never scores the data its config happens to name: it asks for them,
    and takes them back after checking that they are the same."""
    fifty = vaekit.Dataset("mine", {name: digits.split(name).take(slice(0, 50)) for name in ("train", "test")})
    run = vaekit.train("digits", tmp_path / "run", epochs=1, dataset=fifty, verbose=False).dir
    assert json.loads((run / "data.json").read_text())["source"] == "memory"
    with pytest.raises(vaekit.VaekitError, match="passed in memory"):
        vaekit.evaluate(run, k=2)
    _, summary = vaekit.evaluate(vaekit.open_run(run, data=fifty), k=2, save=False)
    assert summary["examples"] == 50
    with pytest.raises(vaekit.VaekitError, match="not those .* was trained on"):
        vaekit.open_run(run, data=digits)


def test_a_run_on_a_data_file_moved_with_it_resumes_with_data_dir(tmp_path, capsys):
    """A run on a .npy moved with its file to another folder resumes there with --data-dir naming the new folder:
    the file's path changed but not its name or its contents. Another file under the same name is refused."""
    first = tmp_path / "first"
    first.mkdir()
    np.save(first / "x.npy", np.random.default_rng(0).random((40, 6), dtype=np.float32))
    train = ["train", "--data", first / "x.npy", "--epochs", "1", "--no-plots", "-q"]
    assert run_cli([*train, "--out", first / "run"], capsys)[0] == 0
    moved = tmp_path / "moved"
    first.rename(moved)
    resume = ["train", "--resume", moved / "run", "--no-plots", "-q", "--data-dir", moved, "--epochs"]
    code, _, err = run_cli([*resume, "2"], capsys)
    assert code == 0, err
    assert [m["epoch"] for m in vaekit.read_metrics(moved / "run")] == [1, 2]
    np.save(moved / "x.npy", np.random.default_rng(1).random((40, 6), dtype=np.float32))
    code, _, err = run_cli([*resume, "3"], capsys)
    assert_one_line_error(code, err)


def test_only_the_same_file_name_in_another_absolute_folder_counts_as_moved():
    """A checkpoint's data path is taken as moved (and the old path compared instead) only for a file of the same
    name now in another folder, given as an absolute path; a renamed file, a relative path or the same path are not;
    and every key of either side is compared, those only the checkpoint has too."""
    from vaekit.checkpoint import _difference, _unmoved

    def data(name: object) -> dict:
        return {"settings": {"data": {"name": name}}}

    assert _unmoved(data("/new/x.npy"), data("/old/x.npy")) == data("/old/x.npy")
    for then, now in [("/old/y.npy", "/new/x.npy"), ("/old/x.npy", "x.npy"), ("/new/x.npy", "/new/x.npy"), (3, "/x")]:
        assert _unmoved(data(now), data(then)) == data(now)
    assert _difference({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == "b.c (3 then, 2 now)"
    assert _difference({"a": 1}, {"a": 1, "d": 4}) == "d (4 then, None now)"
    assert _difference({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 2}}) is None


def test_a_safetensors_file_without_vaekit_metadata_is_not_a_checkpoint(tmp_path):
    """A valid safetensors file with no vaekit metadata (a model's weights, say) is named as not a checkpoint."""
    from safetensors.torch import save_file

    from vaekit.checkpoint import _read

    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    with pytest.raises(vaekit.VaekitError, match=f"^{tmp_path / 'weights.safetensors'} is a safetensors file but "
                       "not a vaekit checkpoint$"):  # fmt: skip
        _read(tmp_path / "weights.safetensors")

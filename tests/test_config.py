"""Property-based tests of the configuration layer: any TOML value of a wrong type, out of range or wrongly nested is
refused with a message naming its key; any valid configuration survives TOML and back unchanged."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaekit import Config, VaekitError
from vaekit.config import from_dict, make_config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SECTIONS = {"data": Config().data, "model": Config().model, "train": Config().train}
KEYS = [(s, f.name) for s, obj in SECTIONS.items() for f in dataclasses.fields(obj)]
BIG = 2**24

# Any value TOML can hold: the pool wrong values are drawn from.
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(min_size=1, max_size=5), inner, max_size=3), max_leaves=6)  # fmt: skip
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).filter(
    lambda t: t not in ("true", "false", "inf", "nan")  # text that command-line parsing would read as TOML
)


containers = st.one_of(st.lists(scalars, max_size=2), st.dictionaries(words, scalars))


def _wrong_type(default: object) -> st.SearchStrategy:
    """TOML values that are not of the kind a key with this default takes."""
    if isinstance(default, bool):
        return st.one_of(
            st.integers(), st.floats(), words, st.lists(scalars, max_size=2), st.dictionaries(words, scalars)
        )
    if isinstance(default, int):
        return st.one_of(
            st.booleans(), st.floats(), words, st.lists(scalars, max_size=2), st.dictionaries(words, scalars)
        )
    if isinstance(default, float):
        return st.one_of(st.booleans(), words, containers)
    if isinstance(default, list):
        not_int = st.one_of(st.booleans(), st.floats(), st.text(), st.lists(st.integers()))
        return st.one_of(st.booleans(), st.integers(), st.floats(), words, st.dictionaries(words, scalars),
                         st.lists(st.integers(0, 9), max_size=2).flatmap(
                             lambda good: not_int.map(lambda bad: [*good, bad])))  # fmt: skip
    if isinstance(default, dict):  # keyword arguments: a table of plain values, never a table of tables
        return st.one_of(st.booleans(), st.integers(), st.floats(), words, st.lists(scalars, max_size=2),
                         st.dictionaries(words, st.dictionaries(words, scalars), min_size=1))  # fmt: skip
    return st.one_of(st.booleans(), st.integers(), st.floats(), containers)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), _wrong_type(getattr(SECTIONS[k[0]], k[1])))))
def test_a_value_of_the_wrong_type_is_refused_naming_its_key(case):
    (section, key), value = case
    with pytest.raises(VaekitError, match=rf"'{section}\.{key}'"):
        from_dict({section: {key: value}})


# Values outside what each numeric key allows (from the README's table of settings).
OUT_OF_RANGE = {
    "train.epochs": st.integers(max_value=0) | st.integers(min_value=10**9 + 1),
    "train.batch_size": st.integers(max_value=0) | st.integers(min_value=BIG + 1),
    "train.eval_batch_size": st.integers(max_value=0) | st.integers(min_value=BIG + 1),
    "train.lr": st.floats(max_value=0) | st.just(math.inf) | st.just(math.nan),
    "train.seed": st.integers(max_value=-1) | st.integers(min_value=2**63),
    "train.k": st.integers(max_value=0) | st.integers(min_value=BIG + 1),
    "train.beta": st.floats(max_value=0, exclude_max=True) | st.just(math.inf) | st.just(math.nan),
    "train.warmup": st.integers(max_value=-1),
    "train.free_bits": st.floats(max_value=0, exclude_max=True) | st.just(math.inf) | st.just(math.nan),
    "train.clip_grad": st.floats(max_value=0, exclude_max=True) | st.just(math.inf) | st.just(math.nan),
    "train.checkpoint_every": st.integers(max_value=-1),
    "train.keep_checkpoints": st.integers(max_value=0),
    "train.patience": st.integers(max_value=-1),
    "train.skip_limit": st.integers(max_value=0),
    "train.compile": st.text(max_size=8).filter(lambda v: v not in ("auto", "on", "off")),
    "train.precision": st.text(max_size=8).filter(lambda v: v not in ("fp32", "bf16")),
    "train.objective": words.filter(lambda t: t not in ("elbo", "iwae")),
    "model.latent": st.integers(max_value=0) | st.integers(min_value=BIG + 1),
    "model.latent2": st.integers(max_value=-1) | st.integers(min_value=BIG + 1),
    "model.hidden": st.lists(st.integers(1, 9), max_size=2).map(lambda v: [*v, 0]),
    "model.hidden2": st.lists(st.integers(1, 9), max_size=2).map(lambda v: [-1, *v]),
    "model.channels": st.just([]) | st.lists(st.integers(1, 9), max_size=2).map(lambda v: [*v, BIG + 1]),
    "model.net": words.filter(lambda t: t not in ("mlp", "conv")),
    "model.variance": words.filter(lambda t: t not in ("fixed", "global")),
    "model.sigma": st.floats(max_value=0) | st.just(math.inf) | st.just(math.nan),
    "model.mixtures": st.integers(max_value=0) | st.integers(min_value=1025),
    "data.validation": st.integers(max_value=-1),
    "data.image_size": st.integers(max_value=0) | st.integers(min_value=4097),
    "data.channels": st.integers().filter(lambda c: c not in (0, 1, 3)),
    "data.test_fraction": st.floats(max_value=0) | st.floats(min_value=1) | st.just(math.nan),
    "data.classes": st.lists(st.integers(0, 9), max_size=2).map(lambda v: [*v, -1]),
}


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(OUT_OF_RANGE)).flatmap(lambda k: st.tuples(st.just(k), OUT_OF_RANGE[k])))
def test_a_value_out_of_range_is_refused_naming_its_key(case):
    key, value = case
    section, name = key.split(".")
    with pytest.raises(VaekitError, match=rf"'{section}\.{name}'"):
        from_dict({section: {name: value}})


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["data", "model", "train"]),
    st.one_of(scalars, st.lists(scalars, max_size=2)),
)
def test_a_section_that_is_not_a_table_is_refused_naming_it(section, value):
    with pytest.raises(VaekitError, match=rf"section '{section}'"):
        from_dict({section: value})


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["data", "model", "train"]), words, toml_values)
def test_an_unknown_key_is_refused_naming_it(section, key, value):
    if key in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        return
    with pytest.raises(VaekitError, match=rf"'{section}\.{key}'"):
        from_dict({section: {key: value}})


def _floats(low: float, high: float | None = None, **kw) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, **kw)


sizes = st.lists(st.integers(1, BIG), max_size=4)
plain_values = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), _floats(-1e300, 1e300), st.text(max_size=8),
                         st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3))  # fmt: skip
arguments = st.dictionaries(st.text(min_size=1, max_size=8), plain_values, max_size=3)
VALID = {
    "data": st.fixed_dictionaries({
        "name": st.text(max_size=20), "root": st.text(max_size=20), "download": st.booleans(),
        "binarize": st.booleans(), "image_size": st.integers(1, 4096), "channels": st.sampled_from([0, 1, 3]),
        "test_fraction": _floats(0, 1, exclude_min=True, exclude_max=True), "validation": st.integers(0, 2**63 - 1),
        "classes": st.lists(st.integers(0, 2**63 - 1), max_size=4), "label_column": st.text(max_size=10),
        "one_hot": st.booleans(),
        "memory_map": st.sampled_from(["auto", "on", "off"]),
    }),
    "model": st.fixed_dictionaries({
        "net": st.sampled_from(["mlp", "conv"]), "hidden": sizes, "channels": sizes.filter(bool),
        "latent": st.integers(1, BIG), "hidden2": sizes, "latent2": st.integers(0, BIG),
        "activation": st.text(max_size=10), "likelihood": st.text(max_size=10),
        "variance": st.sampled_from(["fixed", "global", "per-dim"]), "sigma": _floats(0, None, exclude_min=True),
        "mixtures": st.integers(1, 1024),
    }),
    "train": st.fixed_dictionaries({
        "epochs": st.integers(1, 10**9), "batch_size": st.integers(1, BIG), "lr": _floats(0, None, exclude_min=True),
        "seed": st.integers(0, 2**63 - 1), "device": st.text(max_size=10), "eval_batch_size": st.integers(1, BIG),
        "objective": st.just("elbo"), "k": st.integers(1, BIG), "beta": _floats(0), "warmup": st.integers(0, 2**63 - 1),
        "free_bits": _floats(0), "optimizer": st.text(max_size=10), "optimizer_args": arguments,
        "scheduler": st.text(max_size=10), "scheduler_args": arguments, "clip_grad": _floats(0),
        "checkpoint_every": st.integers(0, 2**63 - 1), "keep_checkpoints": st.integers(1, 2**63 - 1),
        "patience": st.integers(0, 2**63 - 1), "skip_limit": st.integers(1, 2**63 - 1),
        "compile": st.sampled_from(["auto", "on", "off"]), "precision": st.sampled_from(["fp32", "bf16"]),
        "tensorboard": st.booleans(),
    }),
}  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries(VALID), st.text(max_size=10))
def test_a_valid_configuration_round_trips_through_toml(raw, preset):
    cfg = from_dict({"preset": preset, **raw})
    assert cfg.to_dict() == {"preset": preset, **raw}
    again = from_dict(tomllib.loads(cfg.to_toml()))
    assert again == cfg


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), _wrong_type(getattr(SECTIONS[k[0]], k[1])))))
def test_a_config_file_with_a_wrong_value_is_refused_naming_its_key(tmp_path_factory, case):
    import tomli_w

    (section, key), value = case
    path = tmp_path_factory.mktemp("config") / "bad.toml"
    try:
        path.write_text(tomli_w.dumps({section: {key: value}}))
    except (TypeError, ValueError):  # a value tomli_w cannot write (such as a mixed array) cannot be in a file
        return
    with pytest.raises(VaekitError, match=rf"'{section}\.{key}'"):
        make_config(file=path)

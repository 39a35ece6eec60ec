"""The README as a reference: every flag of every command and every configuration key is described in it."""

import dataclasses
import re
from pathlib import Path

from vaekit import Config
from vaekit.cli import _build

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

"""Config files and `precision-suite list`: what a file sets reaches the run, the command line
beats it, and every value `list` prints is one the parsers accept."""

from __future__ import annotations

import argparse

import pytest

from precision_suite.cli import _subcommand, main
from precision_suite.config import load_config, merged_options, run_options
from precision_suite.spec import Case, DEFAULTS, split_list

OPTIONS = run_options(_subcommand("run")._actions)


def test_keys_are_the_run_commands_options():
    dests = {a.dest for a in _subcommand("run")._actions if a.option_strings} - {"help", "config"}
    assert set(OPTIONS) == dests
    assert OPTIONS["bias"].kind == "bool" and OPTIONS["jobs"].kind == "int" and OPTIONS["inits"].kind == "list"
    assert OPTIONS["residual"].kind == "number" and OPTIONS["out"].kind == "str"


def test_config_file_forms(tmp_path):
    (tmp_path / "plain.toml").write_text('depth = [50, 100]\nfail-on = ["nan"]\nquiet = true\n')
    (tmp_path / "tool.toml").write_text('[project]\nname = "x"\n[tool.precision-suite]\nwidth = 16\n')
    assert load_config(str(tmp_path / "plain.toml"), OPTIONS) == {"depth": [50, 100], "fail_on": ["nan"], "quiet": True}
    assert load_config(str(tmp_path / "tool.toml"), OPTIONS) == {"width": 16}
    assert load_config(None, OPTIONS, cwd=tmp_path) == {}  # no pyproject.toml: no options
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.black]\nline-length = 9\n')
    assert load_config(None, OPTIONS, cwd=tmp_path) == {}  # no section: no options


def test_command_line_beats_file_and_an_unset_flag_keeps_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.precision-suite]\nquiet = true\ndepth = 7\nformats = "bf16"\n')
    args = _subcommand("run").parse_args(["--depth", "9"])
    merged = merged_options(argparse.Namespace(**vars(args), command="run"), OPTIONS)
    assert merged == {"quiet": True, "depth": "9", "formats": "bf16"}


def test_run_reads_pyproject_section(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.precision-suite]\ninits = ["normal"]\nactivations = "relu"\n'
                                             'formats = "fp16"\ndepth = 3\nwidth = 8\nbatch = 2\nquiet = true\n'
                                             'out = "here"\n')
    assert main(["run", "--seed", "4"]) == 0
    assert "relu-normal-fp16-cpu-emulated-torch-w8-d3-b2-s4" in capsys.readouterr().out
    assert (tmp_path / "here" / "results.json").exists()


@pytest.fixture(scope="module")
def listed():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["list"]) == 0
    blocks, axis = {}, None
    for line in out.getvalue().splitlines():
        if line.startswith("--"):
            axis = line[2:]
            blocks[axis] = []
        elif axis and line.strip():
            blocks[axis].append(line.strip())
    return blocks


def test_list_shows_every_axis_and_its_default(listed):
    from precision_suite.cli import _LIST_AXES

    assert set(_LIST_AXES) | {"fail-on"} == set(listed)
    for axis, values in DEFAULTS.items():
        if axis in listed:
            assert listed[axis][-1] == f"default: {', '.join(map(str, values))}"


_FIELD = {"inits": "init", "activations": "activation", "formats": "format", "devices": "device", "modes": "mode",
          "backends": "backend", "norms": "norm", "inputs": "input"}


@pytest.mark.parametrize("axis", sorted(_FIELD))
def test_every_listed_name_is_accepted(listed, axis):
    """The first line of each named axis is its registry; each name there makes a valid Case."""
    names = split_list(listed[axis][0])
    assert names
    for name in names:
        Case(**{_FIELD[axis]: name.replace(":N", ":0")})


def test_listed_forms_and_aliases_parse(listed):
    from precision_suite.formats import get_format

    aliases = next(line for line in listed["formats"] if line.startswith("aliases: "))
    for pair in aliases.removeprefix("aliases: ").split(", "):
        alias, canonical = pair.split("=")
        assert get_format(alias).name == canonical
    scaled = next(line for line in listed["formats"] if line.startswith("scaled: "))
    for name in scaled.removeprefix("scaled: ").split(", "):
        assert Case(format=name, mode="emulated").format == name
    assert Case(init="normal(mean=1,std=0.5)").init == "normal(mean=1.0,std=0.5)"
    assert "shifted(mean=..,std=..)" in listed["inputs"][1]

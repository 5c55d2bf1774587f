"""Run options from TOML: ``--config FILE``, else ``[tool.precision-suite]`` in ./pyproject.toml.

Precedence: command line > config file > defaults (``defaults.DEFAULTS``). The keys are the ``run``
command's options (``fail-on`` or ``fail_on``), read from its parser, so the file and the command
line cannot drift apart. Here each value's TOML type is checked; what the value means is checked
where the command line's is (``spec``, the run command). Anything wrong is a ``ConfigError``: one
line naming the file, the section or key, and what is valid. A malformed pyproject.toml is an
error, never a silent run of the default matrix.
"""

from __future__ import annotations

import argparse
import difflib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SECTION", "ConfigError", "Option", "run_options", "load_config", "merged_options"]

SECTION = "precision-suite"  # [tool.precision-suite]
_NOT_OPTIONS = ("help", "config")  # run's options that a config file cannot set


class ConfigError(ValueError):
    """A config file that cannot be used: the one-line message names the file, the key or section, and what is valid."""


@dataclass(frozen=True)
class Option:
    """One settable ``run`` option: its TOML kind (list, int, number, bool, str) and the parser's default."""

    kind: str
    default: object = None


_KINDS = {
    "list": "a comma-separated string, a number or an array of them",
    "int": "an integer",
    "number": "a number",
    "bool": "true or false",
    "str": "a string",
}


def run_options(actions) -> dict[str, Option]:
    """``{dest: Option}`` for the ``run`` parser's ``actions``: flags are bool, ``type=int`` int,
    ``type=float`` number, metavar LIST a list, anything else a string."""
    options = {}
    for action in actions:
        if not action.option_strings or action.dest in _NOT_OPTIONS:
            continue
        if action.nargs == 0:
            kind = "bool"
        elif action.type is int:
            kind = "int"
        elif action.type is float:
            kind = "number"
        else:
            kind = "list" if action.metavar == "LIST" else "str"
        options[action.dest] = Option(kind, action.default)
    return options


def _toml_type(value) -> str:
    for types, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                        (list, "an array"), (dict, "a table")):
        if isinstance(value, types):
            return name
    return "a date/time"


def _fits(kind: str, value) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "list":
        if isinstance(value, list):
            return bool(value) and all(isinstance(v, str) or _fits("number", v) for v in value)
        return isinstance(value, str) or number
    return {"int": isinstance(value, int) and not isinstance(value, bool), "number": number,
            "bool": isinstance(value, bool), "str": isinstance(value, str)}[kind]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(word: str, valid) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_misspelled_section(name: str) -> bool:
    """``precision_suite``, ``PrecisionSuite``, ``precison-suite``: meant as [tool.precision-suite]."""
    squashed = re.sub(r"[^a-z0-9]", "", name.lower())
    return name != SECTION and difflib.SequenceMatcher(None, squashed, "precisionsuite").ratio() >= 0.85


def _read_toml(path: Path, label: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    try:
        text = path.read_bytes().decode("utf-8")
        return tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label}: not UTF-8 text (byte {e.start}); a TOML file is UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{label}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{label}: cannot read {path}: {e.strerror or e}") from None


def _section(data: dict, label: str, required: bool) -> tuple[dict, str]:
    """The [tool.precision-suite] table of ``data`` and where it is; a misspelled one is an error.
    Without ``required`` a file with no such section has no options."""
    tool = data.get("tool", {})
    if not isinstance(tool, dict):
        raise ConfigError(f"{label}: 'tool' must be a table ([tool.{SECTION}]), got {_toml_type(tool)}")
    misplaced = [f"[tool.{k}]" for k in tool if _is_misspelled_section(k)]
    misplaced += [f"[{k}]" for k in data if k == SECTION or _is_misspelled_section(k)]
    if misplaced:
        top = " (or the options at the top level of a --config file)" if label.startswith("--config") else ""
        raise ConfigError(f"{label}: section {misplaced[0]} is not read; the section is [tool.{SECTION}]{top}")
    if SECTION not in tool:
        if required:
            found = ", ".join(f"[tool.{k}]" for k in tool)
            raise ConfigError(f"{label}: no [tool.{SECTION}] section (it has {found})")
        return {}, label
    section = tool[SECTION]
    if not isinstance(section, dict):
        raise ConfigError(f"{label}: [tool.{SECTION}] must be a table of options, got {_toml_type(section)}")
    return section, f"{label} [tool.{SECTION}]"


def load_config(path: str | None, options: dict[str, Option], cwd: str | Path = ".") -> dict:
    """Options from ``path`` (its top-level keys, or its [tool.precision-suite]), else from
    [tool.precision-suite] in ``cwd``/pyproject.toml (none when there is no such file or section).
    Keys come back with underscores; values are the file's, type-checked against ``options``."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config: {'not a file' if file.exists() else 'file not found'}: {path}")
        data = _read_toml(file, f"--config {path}")
        if "tool" in data:
            data, where = _section(data, f"--config {path}", required=True)
        else:
            _section(data, f"--config {path}", required=False)  # a misspelled top-level [precision_suite]
            where = f"--config {path}"
    else:
        file = Path(cwd) / "pyproject.toml"
        if not file.exists():
            return {}
        data, where = _section(_read_toml(file, "pyproject.toml"), "pyproject.toml", required=False)
    config: dict = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        option = options.get(name)
        if option is None:
            valid = sorted(k.replace("_", "-") for k in options)
            raise ConfigError(f"{where}: unknown option {key!r}{_suggest(key.replace('_', '-'), valid)}; "
                              f"valid: {', '.join(valid)}")
        if name in config:
            raise ConfigError(f"{where}: {key!r} is set twice (as {name.replace('_', '-')!r} and {name!r})")
        if not _fits(option.kind, value):
            kind = "an empty array" if value == [] else _toml_type(value)
            raise ConfigError(f"{where}: {key!r} must be {_KINDS[option.kind]}, got {_short(value)} ({kind})")
        config[name] = value
    return config


def merged_options(args: argparse.Namespace, options: dict[str, Option]) -> dict:
    """The command line beats the config file beats the defaults: a command-line value counts
    when it differs from the parser's default (``--quiet`` not given leaves a file's ``quiet``)."""
    merged = load_config(args.config, options)
    for key, value in vars(args).items():
        if key in options and value is not None and value != options[key].default:
            merged[key] = value
    return merged

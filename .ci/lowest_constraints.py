"""Print ``name==<lower bound>`` for every runtime dependency of pyproject.toml that applies here.

The lowest-versions CI lane installs with ``pip install -c <this output>``, so the pins are the
lower bounds pyproject.toml declares and cannot drift from them. A dependency whose marker does
not apply to this interpreter (``tomli; python_version < '3.11'`` on 3.11+) is left out; one
without a lower bound (``>=``, ``==``, ``~=``) is an error: a floor is what the lane tests.
Usage: python .ci/lowest_constraints.py [pyproject.toml] > constraints.txt
       python .ci/lowest_constraints.py --check [pyproject.toml]   (in the lowest lane's venv: every
       runtime dependency is installed at exactly its lower bound; prints the versions the lane runs)
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

SHOWN = ("pytest", "hypothesis")  # test tools, not pinned: reported beside the pins


def lower_bounds(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for line in deps:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        floors = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
        if len(floors) != 1:
            raise SystemExit(f"{pyproject}: {line!r} needs exactly one lower bound (>=, == or ~=)")
        pins.append(f"{canonicalize_name(req.name)}=={floors[0]}")
    return pins


def check(pins: list[str]) -> int:
    """0 when every pinned distribution is installed at its pin, else 1 (1.24 == 1.24.0; a local
    label such as +cpu is ignored)."""
    wrong, seen = [], []
    for pin in pins:
        name, want = pin.split("==")
        try:
            got = version(name)
        except PackageNotFoundError:
            got = "not installed"
        seen.append(f"{name} {got}")
        if got == "not installed" or Version(Version(got).public) != Version(want):
            wrong.append(f"{name}: installed {got}, lower bound {want}")
    for name in SHOWN:
        try:
            seen.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    print("lowest lane runs: " + ", ".join(seen))
    for line in wrong:
        print(f"lowest lane: {line}", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    checking = "--check" in args
    args = [a for a in args if a != "--check"]
    path = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "pyproject.toml"
    pins = lower_bounds(path)
    if checking:
        raise SystemExit(check(pins))
    print("\n".join(pins))

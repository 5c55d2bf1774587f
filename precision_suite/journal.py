"""The run journal: every finished case appended to a JSON-lines file beside the results, so that
a run killed at any point (SIGINT, SIGTERM, SIGKILL, a power cut) can be resumed.

``results.json.journal`` holds one JSON document per line:

- line 1, the header: ``{"journal": JOURNAL, "version": 1, "tool_version", "created",
  "run": {"backward", "rel_error", "cases": [spec, ...]}}`` — what the run was asked to do;
- ``{"environment": {...}}`` — a machine's fingerprint, appended before the first case it
  ran; cases point at it by its order among the environment lines (as in the results JSON);
- ``{"case": {...}}`` — one finished case, exactly as the results JSON holds it.

Lines are appended and flushed as cases finish, and fsync'd after each unit, so at most the last
line is torn by a kill: a last line without its newline, or one that is not JSON, is dropped when the journal is
read (and cut off before appending). A damaged line anywhere else is an error.

``PRECISION_SUITE_TEST_KILL_AT`` is a test hook: ``POINT`` or ``POINT:N`` (the N-th time there)
makes the process SIGKILL itself at that point, so that tests reach exact moments of a run without
sleeps. Points: ``journal-started`` (header written, nothing run), ``case:N`` (N cases journaled:
a unit's cases are journaled one by one), ``torn:N`` (half of the N-th line written), and the
runner's ``unit:N`` (this process starts its N-th unit, workers busy with theirs),
``final-write`` (every case journaled, the results not yet written) and ``results-written``
(results written, the journal not yet removed).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["JOURNAL", "JournalError", "Journal", "journal_path", "run_identity", "kill_point", "timeless"]

JOURNAL = "precision-suite/journal"
_VERSION = 1
KILL_ENV = "PRECISION_SUITE_TEST_KILL_AT"


class JournalError(ValueError):
    """A journal that cannot be resumed: another run's, another version's, or damaged (one line)."""


def journal_path(json_path: str | os.PathLike) -> Path:
    """``reports/results.json`` -> ``reports/results.json.journal``."""
    json_path = Path(json_path)
    return json_path.with_name(json_path.name + ".journal")


def timeless(payload: dict) -> dict:
    """A results payload without its timing fields — the top level's ``created`` and each case's
    ``seconds``, nothing else: what a resumed run's results share, bit for bit, with an
    uninterrupted run's."""
    out = {k: v for k, v in payload.items() if k != "created"}
    out["cases"] = [{k: v for k, v in case.items() if k != "seconds"} for case in payload["cases"]]
    return out


def run_identity(cases, backward: bool, rel_error: bool) -> dict:
    """What decides a run's results: its cases' full specs, in order, and the passes it records.
    (Threads and jobs do not: results do not depend on them.)"""
    identity = {"backward": bool(backward), "rel_error": bool(rel_error), "cases": [c.to_dict() for c in cases]}
    return json.loads(_dumps(identity))  # as a journal reads it back: tuples are lists


_hits: dict[str, int] = {}


def _reached(point: str) -> bool:
    """Whether this is the moment ``$PRECISION_SUITE_TEST_KILL_AT`` names: ``point`` (its first
    time here) or ``point:N`` (its N-th). Always False when the variable is unset."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted or wanted.split(":")[0] != point:
        return False
    _hits[point] = _hits.get(point, 0) + 1
    return _hits[point] == int(wanted.partition(":")[2] or 1)


def kill_point(point: str) -> None:
    """SIGKILL this process here if the test hook names this point (``_reached``)."""
    if _reached(point):
        os.kill(os.getpid(), signal.SIGKILL)


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


@dataclass
class Journal:
    """An open journal: ``restored`` (case dicts read back, by id) and ``environments`` (every
    fingerprint it holds); ``record`` appends cases, ``remove`` deletes it once the results are
    written."""

    path: Path
    identity: dict
    created: str
    environments: list = field(default_factory=list)
    restored: dict = field(default_factory=dict)
    _file: object = None

    @classmethod
    def start(cls, path: str | os.PathLike, identity: dict, resume: bool) -> "Journal":
        """Open the journal of a run with ``identity`` (``run_identity``). With ``resume`` an
        existing journal is read back and must be this run's (else ``JournalError``); without
        it, or when there is none, a new one replaces whatever was there."""
        path = Path(path)
        journal = cls._read(path, identity) if resume and path.exists() else None
        if journal is not None:
            journal._file = open(path, "a", encoding="utf-8")
            return journal
        journal = cls(path, identity, _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        from . import __version__

        header = {"journal": JOURNAL, "version": _VERSION, "tool_version": __version__, "created": journal.created,
                  "run": identity}
        path.parent.mkdir(parents=True, exist_ok=True)
        journal._file = open(path, "w", encoding="utf-8")
        journal._write(header)
        journal.sync()
        kill_point("journal-started")
        return journal

    @classmethod
    def _read(cls, path: Path, identity: dict) -> "Journal | None":
        """The journal at ``path``; None when not even its header was written whole."""
        from . import __version__

        with open(path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")
        complete = lines[:-1]  # the part after the last newline is torn (or empty)
        docs, good_end = [], 0
        for number, line in enumerate(complete, 1):
            try:
                docs.append(json.loads(line))
            except ValueError:
                if number < len(complete):  # only the last line can be torn by a kill
                    raise JournalError(f"journal {path} is damaged at line {number}; run again without --resume "
                                       f"to start over") from None
                break
            good_end += len(line) + 1
        if good_end < len(data):  # cut the torn line off, so the next append starts a line of its own
            with open(path, "r+b") as f:
                f.truncate(good_end)
        if not docs:
            return None
        if not isinstance(docs[0], dict) or docs[0].get("journal") != JOURNAL:
            raise JournalError(f"{path} is not a precision-suite journal; run again without --resume to start over")
        header = docs[0]
        if header.get("version") != _VERSION or header.get("tool_version") != __version__:
            raise JournalError(f"journal {path} was written by precision-suite {header.get('tool_version')} "
                               f"(journal version {header.get('version')}); this is {__version__}: run again "
                               f"without --resume to start over")
        difference = _difference(header.get("run"), identity)
        if difference:
            raise JournalError(f"--resume: the interrupted run in {path} had other arguments ({difference}); "
                               f"resume with the same arguments, or run without --resume to start over")
        journal = cls(path, identity, header.get("created", ""))
        for number, doc in enumerate(docs[1:], 2):
            if isinstance(doc, dict) and isinstance(doc.get("environment"), dict):
                journal.environments.append(doc["environment"])
            elif isinstance(doc, dict) and isinstance(doc.get("case"), dict) and "id" in doc["case"]:
                journal.restored[doc["case"]["id"]] = doc["case"]
            else:
                raise JournalError(f"journal {path} is damaged at line {number} (neither a case nor an environment); "
                                   f"run again without --resume to start over")
        return journal

    def environment_index(self, env: dict) -> int:
        """The index of ``env`` among the journal's environments, appending it when new."""
        encoded = json.loads(_dumps(env))  # as it reads back (tuples -> lists)
        if encoded not in self.environments:
            self._write({"environment": encoded})
            self.sync()
            self.environments.append(encoded)
        return self.environments.index(encoded)

    def record(self, case_dict: dict) -> None:
        """Append one finished case (``CaseResult.to_dict()``), flushed: a kill of this process
        loses nothing written. ``sync`` makes it survive a power cut too."""
        self._write({"case": case_dict})
        kill_point("case")

    def sync(self) -> None:
        """fsync the journal (once per unit: ~6 ms a call here, too dear once per case)."""
        os.fsync(self._file.fileno())

    def _write(self, doc: dict) -> None:
        line = _dumps(doc) + "\n"
        if _reached("torn"):  # the test hook: a write cut short by a kill
            self._file.write(line[: len(line) // 2])
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._file.write(line)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        """The run is complete and its results written: the journal has nothing left to give."""
        self.close()
        self.path.unlink(missing_ok=True)


def _difference(old, new: dict) -> str:
    """What differs between two ``run_identity`` dicts, in words ("" when nothing)."""
    from .spec import Case

    if not isinstance(old, dict) or not isinstance(old.get("cases"), list):
        return "its header does not say which"
    out = []
    if old.get("backward") != new["backward"]:
        out.append(f"--no-backward {'given then, not now' if new['backward'] else 'given now, not then'}")
    if old.get("rel_error") != new["rel_error"]:
        out.append(f"--rel-error {'given now, not then' if new['rel_error'] else 'given then, not now'}")
    try:
        old_ids = [Case.from_dict(spec).id for spec in old["cases"]]
    except (TypeError, ValueError, AttributeError):
        return "its case list is not readable"
    new_ids = [Case.from_dict(spec).id for spec in new["cases"]]
    missing = [i for i in new_ids if i not in set(old_ids)]
    extra = [i for i in old_ids if i not in set(new_ids)]
    if missing:
        out.append(f"{len(missing)} of this run's {len(new_ids)} cases are not in it, e.g. {missing[0]}")
    if extra:
        out.append(f"{len(extra)} of its {len(old_ids)} cases are not in this run, e.g. {extra[0]}")
    if not out and old["cases"] != new["cases"]:
        out.append("the same case ids, in another order or with other spec fields")
    return "; ".join(out)

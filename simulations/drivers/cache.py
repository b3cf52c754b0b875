"""Finished runs found again instead of simulated again.

A virtual-time run is a function of what it was asked: the scenario, its
parameters (:attr:`simulations.scenario.Scenario.params`, every value after the
file and the overrides), the seed, the mode, and the code that ran it. So a run
directory that holds a run of the same five is that run, and re-running a
notebook or a sweep need not simulate it again.

* :func:`run_key` is a pure function of the five: equal inputs, equal keys; a
  different parameter, seed, mode or code version, a different key.
* :func:`code_version` hashes the contents of every ``.py`` file of
  ``workbench/`` and ``simulations/`` (:func:`code_hash`), once per process: any
  edit to the runtime or the lab makes every earlier run a miss.
* :func:`remember` writes the key to ``run-key.json`` in the run's directory
  *after* the run finished (atomically, by rename), with a hash of the
  ``manifest.json`` that run wrote, and :func:`forget` removes it before a run
  starts; so a run interrupted halfway, or overwritten halfway, is never a hit.
* :func:`hit` is true only for a matching key beside that very manifest: a
  directory another run rewrote since (``workbench simulate --out`` over it,
  which knows nothing of keys) has a new manifest and is a miss, never the old
  key passed off as the new run.

The key file may also carry the sweep's row for the run (its measures), so a
cached sweep run costs a file read, not a reload and a re-check.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulations.scenario import Scenario

#: The file in a run directory that says which run it holds.
KEY_FILE = "run-key.json"
#: The packages whose code makes a run what it is.
CODE_PACKAGES = ("workbench", "simulations")


def run_key(scenario: str, params: dict[str, Any], seed: int, mode: str, code: str) -> str:
    """The cache key of a run: a hash of its scenario name, parameters, seed, mode
    and code version (canonical JSON, so dict order does not matter)."""
    payload = {"scenario": scenario, "params": params, "seed": seed, "mode": mode,
               "code": code}  # fmt: skip
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def key_of(scenario: Scenario, seed: int, mode: str = "virtual") -> str:
    """:func:`run_key` of a loaded scenario and seed, with this process's code version."""
    return run_key(scenario.name, scenario.params, seed, mode, code_version())


def code_hash(files: Iterable[tuple[str, Path]]) -> str:
    """A hash of ``(name, path)`` pairs' names and contents, in name order."""
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def code_files(packages: Iterable[str] = CODE_PACKAGES) -> list[tuple[str, Path]]:
    """Every ``.py`` file of ``packages`` (importable here), named relative to its parent."""
    from importlib.util import find_spec

    files = []
    for package in packages:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{package!r} is not an importable package")
        root = Path(next(iter(spec.submodule_search_locations)))
        files += [(str(p.relative_to(root.parent)), p) for p in root.rglob("*.py")]
    return files


@functools.cache
def code_version() -> str:
    """The hash of this process's ``workbench`` and ``simulations`` code (computed once)."""
    return code_hash(code_files())[:16]


def read(directory: str | Path) -> dict[str, Any] | None:
    """The key file of ``directory`` (``key``, ``manifest`` and, from a sweep, ``row``),
    or None (none, or not a JSON object)."""
    try:
        stored = json.loads((Path(directory) / KEY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def hit(directory: str | Path, key: str) -> bool:
    """``directory`` holds the finished run of ``key``: its key, beside the manifest
    that run wrote."""
    stored = read(directory)
    return (
        stored is not None
        and stored.get("key") == key
        and stored.get("manifest") == _manifest_hash(directory)
    )


def _manifest_hash(directory: str | Path) -> str | None:
    """The hash of ``directory``'s ``manifest.json`` (written last by a run), or None."""
    try:
        return hashlib.sha256((Path(directory) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


def forget(directory: str | Path) -> None:
    """Before a run (re)writes ``directory``: it no longer holds a cached run."""
    (Path(directory) / KEY_FILE).unlink(missing_ok=True)


def remember(
    directory: str | Path, key: str, row: dict[str, Any] | None = None, **about: Any
) -> None:
    """After the run in ``directory`` finished: it is the run of ``key``. ``row``:
    the sweep's measures of it; ``about``: what the key was made of, for people."""
    manifest = _manifest_hash(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory} has no manifest.json: not a finished run")
    path = Path(directory) / KEY_FILE
    tmp = path.with_suffix(".tmp")
    body: dict[str, Any] = {"key": key, "manifest": manifest, **about}
    if row is not None:
        body["row"] = row
    tmp.write_text(json.dumps(body, indent=2, default=str))
    os.replace(tmp, path)


__all__ = [
    "CODE_PACKAGES", "KEY_FILE", "code_files", "code_hash", "code_version", "forget", "hit",
    "key_of", "read", "remember", "run_key",
]  # fmt: skip

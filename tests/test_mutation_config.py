"""The mutation-testing configuration names things that exist (`make mutation`).

Mutation testing itself is too slow for `make test`; this only checks, in
milliseconds, that ``[tool.mutmut]`` mutates files that exist, selects tests that
exist, and that every explained equivalent mutant names a mutated module and a reason.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def test_the_mutated_cores_and_their_tests_exist() -> None:
    config = _config()
    assert config["only_mutate"], "nothing to mutate"
    for path in config["only_mutate"]:
        assert (ROOT / path).is_file(), path
        assert path.startswith(tuple(config["source_paths"])), path
    for selection in config["pytest_add_cli_args_test_selection"]:
        path, _, test = selection.partition("::")
        assert (ROOT / path).is_file(), selection
        if test:
            assert re.search(rf"^def {re.escape(test)}\(", (ROOT / path).read_text(), re.M), test


def test_every_equivalent_mutant_names_a_mutated_module_and_a_reason() -> None:
    modules = {p.removesuffix(".py").replace("/", ".") for p in _config()["only_mutate"]}
    entries = tomllib.loads((ROOT / "bench" / "mutation_equivalents.toml").read_text())
    assert entries["equivalent"]
    names = [e["mutant"] for e in entries["equivalent"]]
    assert len(names) == len(set(names)), "an equivalent mutant is listed twice"
    for entry in entries["equivalent"]:
        module = entry["mutant"].rsplit(".", 1)[0]
        assert module in modules, entry["mutant"]
        assert "__mutmut_" in entry["mutant"] and len(entry["reason"]) > 20, entry

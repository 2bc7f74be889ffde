"""The package's import graph runs one way: from the commands down to the foundations.

Read with `ast` from src/aeselect (imports inside functions count too): a folder (or top-level
module) imports only from itself and from lower layers, so a reader learns a layer from the
layers below it, and no two folders need each other.
"""

from __future__ import annotations

import ast
from functools import cache

from conftest import ROOT

PACKAGE = ROOT / "src" / "aeselect"
# Lowest first. A unit is a folder of the package or a top-level module.
LAYERS = (
    ("config", "envvars", "paths", "dvc", "git", "imageops"),  # foundations, stdlib and yaml
    ("gpu",),  # one GPU per experiment: a lock file per device id
    ("model", "data", "runtime", "sandbox"),  # network, prepared data, hardware; project copies
    ("scoring",),  # metrics, pictures and the val-set pass that training and evaluation share
    ("training", "evaluation", "handoff"),  # what the stages run
    ("probe",),  # the diffusability probe of the exported latent (through the hand-off)
    ("stages",),  # the DVC stage entries
    ("sweep",),  # a phase file's experiments and their DVC state, run locally
    ("phases",),  # decisions on a sweep: requirements, the noise, the pruning rule at a rung
    ("cluster",),  # running a sweep (the drainer, SLURM), pruning at rungs by the phases' rule
    ("demo", "phase_cli"),  # the Phase 1 demo and the `aeselect phase` commands
    ("cli",),  # the `aeselect` command line
    ("__main__",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# Upward or sideways edges that other work still has to remove; each must still exist (see
# test_known_exceptions_still_exist), so the list only shrinks.
KNOWN: dict[tuple[str, str], str] = {}


def unit_of(module: str) -> str:
    """aeselect.training.loop -> training; aeselect.paths -> paths; aeselect -> aeselect."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def edges() -> dict[tuple[str, str], list[str]]:
    """{(importing unit, imported unit): ['module -> module', ...]} between different units."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        if importer == "aeselect":  # the public facade (lazy load_autoencoder) sits on top
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("aeselect."):
                    pair = (unit_of(importer), unit_of(name))
                    if pair[0] != pair[1]:
                        found.setdefault(pair, []).append(f"{importer} -> {name}")
    return found


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(path)) for path in PACKAGE.rglob("*.py")} - {"aeselect"}
    assert units <= set(RANK), f"add to LAYERS: {sorted(units - set(RANK))}"


def test_training_and_evaluation_never_import_each_other():
    crossing = {
        pair: where for pair, where in edges().items() if set(pair) == {"training", "evaluation"}
    }
    assert not crossing, crossing


def test_imports_only_run_down_the_layers():
    upward = {
        pair: where
        for pair, where in edges().items()
        if RANK[pair[1]] >= RANK[pair[0]] and pair not in KNOWN
    }
    assert not upward, "imports of the same or a higher layer:\n" + "\n".join(
        f"{a} -> {b}: {where}" for (a, b), where in upward.items()
    )


def test_no_cycle_between_units():
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        if (a, b) not in KNOWN:
            graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cyclic = sorted(unit for unit in graph if reaches(unit, unit, set()))
    assert not cyclic, f"units on an import cycle: {cyclic}"


def test_known_exceptions_still_exist():
    gone = [pair for pair in KNOWN if pair not in edges()]
    assert not gone, f"fixed, so remove from KNOWN: {gone}"


MAX_FUNCTION_LINES = 60  # from `def` to the last line, docstring included: one screen
# Functions other work is still splitting; each must still be long, so the list only shrinks.
LONG_FOR_NOW: set[str] = set()


@cache
def function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{module}.{node.name}"  # methods of two classes share one: keep the longer
                lengths[name] = max(lengths.get(name, 0), node.end_lineno - node.lineno + 1)
    return lengths


def test_functions_fit_on_a_screen():
    long = {
        name: lines
        for name, lines in function_lengths().items()
        if lines > MAX_FUNCTION_LINES and name not in LONG_FOR_NOW
    }
    assert not long, f"split these (lines): {long}"
    done = sorted(n for n in LONG_FOR_NOW if function_lengths().get(n, 0) <= MAX_FUNCTION_LINES)
    assert not done, f"short now, so remove from LONG_FOR_NOW: {done}"

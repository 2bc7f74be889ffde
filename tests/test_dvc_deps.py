"""dvc.yaml's deps and params cover what each stage's code imports and reads, derived from the code.

DVC re-runs a stage only when a declared dep or param changes, so an undeclared module or key
lets it serve a stale result. The stage's code is derived from its entry, `run_<stage>` in the
module its `cmd` runs (`python -m aeselect.stages <stage>`), by following imports with `ast`:
the entry module's top-level imports and those of `run_<stage>` (and of the module's own helpers it
calls); every module imported from there with all of its imports (any of its functions may run);
parent packages with their top-level imports (they execute, their functions need not). The
params it reads are the attribute reads on arguments annotated with the config classes.
"""

from __future__ import annotations

import ast
import dataclasses
import shlex
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, git

from aeselect import config

SRC = ROOT / "src"
PACKAGE = "aeselect"
# Never part of a stage: the interactive commands (parsers, phase sweeps, the demo).
NOT_STAGE_CODE = ("aeselect.cli", "aeselect.phase_cli", "aeselect.demo", "aeselect.phases")


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The source file of a module of this package, or None (a third-party or stdlib module)."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def parse(name: str) -> ast.Module:
    path = module_file(name)
    assert path is not None, name
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(nodes: list[ast.AST], importer: str) -> set[str]:
    """Modules of this package named by the import statements in `nodes` (walked)."""
    is_package = module_file(importer).name == "__init__.py"
    found: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                parts = importer.split(".")[: len(importer.split(".")) - node.level + is_package]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            # `from pkg import sub` imports the submodule pkg.sub where one exists.
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if module_file(name) is not None}


def top_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements that run on import: everything but function bodies."""
    return [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def entry_functions(module: str, entry: str) -> list[ast.FunctionDef]:
    """`entry` and the module's own functions it calls, transitively."""
    functions = {n.name: n for n in parse(module).body if isinstance(n, ast.FunctionDef)}
    assert entry in functions, f"{module_file(module)} has no function {entry}"
    todo, seen = [entry], {entry}
    while todo:
        for node in ast.walk(functions[todo.pop()]):
            if isinstance(node, ast.Name) and node.id in functions and node.id not in seen:
                seen.add(node.id)
                todo.append(node.id)
    return [functions[name] for name in sorted(seen)]


@dataclass
class StageCode:
    """A stage's modules (with the import chain that reached each) and the functions it may run."""

    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    functions: list[tuple[str, ast.FunctionDef]] = field(default_factory=list)

    def paths(self) -> dict[str, tuple[str, ...]]:
        """{path relative to the repository: import chain}."""
        return {
            module_file(name).relative_to(ROOT).as_posix(): chain
            for name, chain in self.chains.items()
        }


def stage_entry(stage: str) -> tuple[str, str]:
    """(module, function) the stage runs; its cmd must be `python -m <module> <stage>`."""
    argv = shlex.split(dvc_stages()[stage]["cmd"])
    while argv and "=" in argv[0]:  # leading VAR=value assignments
        argv.pop(0)
    assert argv[:2] == ["python", "-m"] and argv[3:] == [stage], (
        f"dvc.yaml: stages.{stage}.cmd must be `python -m <module> {stage}`, got {argv}"
    )
    return argv[2], f"run_{stage}"


def stage_code(stage: str) -> StageCode:
    module, entry = stage_entry(stage)
    code = StageCode()
    to_scan: list[str] = []  # modules reached by an import: every import in them counts

    def reach(name: str, chain: tuple[str, ...], whole: bool) -> None:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            reached = ".".join(parts[:depth])
            if reached not in code.chains:
                code.chains[reached] = (*chain, reached)
                if reached != name:  # a parent package runs its top level first
                    for sub in imported_modules(top_level(parse(reached)), reached):
                        reach(sub, code.chains[reached], whole=True)
        if whole and name not in to_scan:
            to_scan.append(name)

    reach(module, (), whole=False)
    entries = entry_functions(module, entry)
    code.functions += [(module, fn) for fn in entries]
    for sub in imported_modules([*top_level(parse(module)), *entries], module):
        reach(sub, (f"{module}.{entry}",), whole=True)
    for name in to_scan:  # grows while it is walked
        tree = parse(name)
        code.functions += [
            (name, n)
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        for sub in imported_modules([tree], name):
            reach(sub, code.chains[name], whole=True)
    return code


# --- params: attribute reads on config-typed arguments --------------------------------------


def _fields(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


@cache
def config_classes() -> dict[str, tuple[str, type]]:
    """{class name: (dotted prefix, class)}: Config is the root, each section its key."""
    classes = {config.Config.__name__: ("", config.Config)}
    for name, hint in _fields(config.Config).items():
        if dataclasses.is_dataclass(hint):
            classes[hint.__name__] = (name, hint)
    return classes


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _whole(prefix: str) -> set[str]:
    """A read of a whole section is that section; of the whole config, every top-level key."""
    return {prefix} if prefix else set(_fields(config.Config))


def _chain(node: ast.Attribute) -> tuple[str | None, list[str]]:
    attrs: list[str] = []
    value: ast.AST = node
    while isinstance(value, ast.Attribute):
        attrs.insert(0, value.attr)
        value = value.value
    return (value.id if isinstance(value, ast.Name) else None), attrs


@cache
def _method_reads(class_name: str, method: str) -> frozenset[str]:
    """Keys a config class's own method or property reads through `self` (asdict(self): all)."""
    prefix, cls = config_classes()[class_name]
    node = next(
        n
        for n in parse("aeselect.config").body
        if isinstance(n, ast.ClassDef) and n.name == cls.__name__
    )
    fn = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    reads = set(_reads_in(fn, {"self": class_name}))
    bases = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
    if any(isinstance(n, ast.Name) and n.id == "self" and id(n) not in bases for n in ast.walk(fn)):
        reads |= _whole(prefix)  # self handed on whole, e.g. dataclasses.asdict(self)
    return frozenset(reads)


def _resolve(class_name: str, attrs: list[str]) -> set[str]:
    prefix, cls = config_classes()[class_name]
    name, rest = attrs[0], attrs[1:]
    hints = _fields(cls)
    if name in hints:
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            return _resolve(hint.__name__, rest) if rest else _whole(_key(prefix, name))
        return {_key(prefix, name)}
    if callable(getattr(cls, name, None)) or isinstance(getattr(cls, name, None), property):
        return set(_method_reads(class_name, name))
    return set()  # not a config attribute


def _reads_in(fn: ast.FunctionDef, bound: dict[str, str]) -> set[str]:
    reads: set[str] = set()
    outer = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and id(node) not in outer:
            base, attrs = _chain(node)
            if base in bound:
                reads |= _resolve(bound[base], attrs)
    return reads


def _annotation_name(annotation: ast.AST | None) -> str | None:
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return annotation.value
    if isinstance(annotation, ast.Name):
        return annotation.id
    if isinstance(annotation, ast.Attribute):
        return annotation.attr
    return None


def params_read(code: StageCode) -> dict[str, str]:
    """{params key: where it is read}, from arguments annotated with a config class."""
    found: dict[str, str] = {}
    for module, fn in code.functions:
        arguments = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
        bound = {
            a.arg: _annotation_name(a.annotation)
            for a in arguments
            if _annotation_name(a.annotation) in config_classes()
        }
        for key in sorted(_reads_in(fn, bound)):
            found.setdefault(key, f"{module_file(module).relative_to(ROOT)}:{fn.name}")
    return found


def covered(item: str, declared: list[str], separator: str) -> bool:
    return any(item == d or item.startswith(d.rstrip(separator) + separator) for d in declared)


# --- the tests ------------------------------------------------------------------------------

STAGES = list(dvc_stages())


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_the_modules_it_imports(stage):
    declared = [str(dep) for dep in dvc_stages()[stage].get("deps", [])]
    missing = {
        path: chain
        for path, chain in stage_code(stage).paths().items()
        if not covered(path, declared, "/")
    }
    assert not missing, f"dvc.yaml: stages.{stage}.deps lacks code the stage imports; add:\n" + (
        "\n".join(f"      - {path}   # {' -> '.join(chain)}" for path, chain in missing.items())
    )


@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_cover_the_keys_it_reads(stage):
    declared = [str(p) for p in dvc_stages()[stage].get("params", [])]
    missing = {
        key: where
        for key, where in params_read(stage_code(stage)).items()
        if not covered(key, declared, ".")
    }
    assert not missing, f"dvc.yaml: stages.{stage}.params lacks keys the stage reads; add:\n" + (
        "\n".join(f"      - {key}   # read in {where}" for key, where in sorted(missing.items()))
    )


@pytest.mark.parametrize("stage", STAGES)
def test_stage_code_is_lean(stage):
    """A stage never runs the CLI's parser, the phase commands or the demo."""
    chains = stage_code(stage).chains
    heavy = {
        name: chain
        for name, chain in chains.items()
        if any(name == bad or name.startswith(bad + ".") for bad in NOT_STAGE_CODE)
    }
    assert not heavy, f"stage {stage} imports interactive code: " + "; ".join(
        " -> ".join(chain) for chain in heavy.values()
    )


def test_the_derivation_sees_what_the_stages_use():
    """Guards the test itself: known imports and reads are found, so a pass means something."""
    train = stage_code("train").paths()
    assert "src/aeselect/training/loop.py" in train
    assert "src/aeselect/imageops.py" in train  # via scoring.metrics
    assert "src/aeselect/training/__init__.py" in train  # a parent package runs too
    prepare = stage_code("prepare").paths()
    assert "src/aeselect/model/autoencoder.py" not in prepare
    reads = params_read(stage_code("evaluate"))
    assert {"evaluate.max_mse", "seed"} <= reads.keys()
    assert "train.device" in reads  # select_runtime(cfg.train): the whole section
    assert {"data.image_size", "data.root", "data.mask_root"} <= params_read(
        stage_code("prepare")
    ).keys()


def test_prepare_depends_on_the_folder_holding_images_and_masks():
    """data.root and data.mask_root (defaults) lie inside the input folder prepare depends on,
    and that folder exists in every clone, so a clone without masks or images still runs."""
    from aeselect.paths import INPUT_DIR

    deps = [str(dep) for dep in dvc_stages()["prepare"]["deps"]]
    assert INPUT_DIR.as_posix() in deps
    defaults = config.DataConfig()
    for folder in (defaults.root, defaults.mask_root):
        assert Path(folder).is_relative_to(INPUT_DIR), folder
    assert git(ROOT, "ls-files", INPUT_DIR.as_posix()).split() == [f"{INPUT_DIR}/README.md"]

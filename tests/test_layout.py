"""The import direction of the package, one layer per package: cli -> commands -> run -> model, data, config;
never back up.

Every module's imports (at the top or inside a function) are read with `ast`, without importing anything.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import lmforge

PACKAGE = Path(lmforge.__file__).parent

# A module may import modules of a lower layer, and modules of its own package. Each package (a folder, or a
# module at the top) has one layer: there are no per-module entries.
LAYERS = {
    "lmforge": 0, "lmforge.errors": 0,
    "lmforge.inputs": 1,  # the input-file check (no fifo, device or symlink loop): config reads files through it
    "lmforge.files": 2, "lmforge.plots": 2, "lmforge.config": 2,
    "lmforge.extras": 2,  # which optional package each extra brings, and the one line when one is missing
    # the building blocks: tokenizer, chat template, shards; the model, its heads, LoRA, the fine-tuned builder
    "lmforge.model": 3, "lmforge.data": 3,
    "lmforge.scratch": 4,
    "lmforge.run": 5,
    "lmforge.hardware": 5,  # devices, precision, autocast, MFU: inference needs them as much as training
    "lmforge.infer": 6,  # loading a run, generation, evaluation: what every command on a run needs
    "lmforge.interop": 7, "lmforge.train": 7,  # train: the one loop, for pretraining and every fine-tuning kind
    "lmforge.tasks": 8,  # the task kinds, and the commands on them: finetune (drives the trainer), eval --task, predict
    "lmforge.serve": 9,  # the HTTP server: the batched engine behind the OpenAI API
    "lmforge.bench": 9,  # times the trainer's engine
    "lmforge.lab": 9,  # compare, sweep (drives the trainer and fine-tuning), the teaching plots
    "lmforge.report": 10,  # its histograms (lab.inside); a fine-tuning run's section evaluates its task
    "lmforge.arguments": 11,  # each command's flags (the server's limits come from serve.cli)
    "lmforge.cli": 12,
    "lmforge.__main__": 13,
}


def module_names() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lmforge modules a file imports: `from lmforge.x import y` names lmforge.x.y if that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in modules else node.module for name in names]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] == "lmforge")
    return found


def layer(module: str) -> int:
    """The layer of the module's package (lmforge.train.trainer: lmforge.train's)."""
    return LAYERS[top_package(module)]


def top_package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up, or sideways into another package of the same layer (within a package,
    modules import each other freely)."""
    found = []
    for importer, imported in graph.items():
        for target in imported:
            if target == "lmforge" or top_package(target) == top_package(importer):
                continue
            if layer(target) >= layer(importer):
                found.append(f"{importer} (layer {layer(importer)}) imports {target} (layer {layer(target)})")
    return sorted(found)


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(path, set(modules)) for name, path in modules.items()}


def test_layers_name_packages_only():
    """One entry per package (a folder, or a module at the top), never one for a module inside a folder."""
    packages = {top_package(module) for module in module_names()}
    assert set(LAYERS) == packages


def test_every_module_has_a_layer():
    unplaced = []
    for module in module_names():
        try:
            layer(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_imports_run_one_way():
    assert violations(import_graph()) == []


def test_nothing_outside_train_imports_it():
    """Besides the layers: train/ is imported only by the commands that drive training."""
    drivers = {"lmforge.cli", "lmforge.bench", "lmforge.lab.sweep", "lmforge.tasks.finetune"}
    importers = {importer for importer, imported in import_graph().items()
                 if not importer.startswith(("lmforge.train", *drivers))
                 and any(target.startswith("lmforge.train")
                         for target in imported)}
    assert importers == set()


def test_the_check_catches_an_import_that_goes_up():
    bad = {"lmforge.run": {"lmforge.train.trainer"}, "lmforge.lab.compare": {"lmforge.report"},
           "lmforge.model.gpt": {"lmforge.config"}}
    assert violations(bad) == ["lmforge.lab.compare (layer 9) imports lmforge.report (layer 10)",
                               "lmforge.run (layer 5) imports lmforge.train.trainer (layer 7)"]


def test_the_check_catches_an_import_sideways_and_from_below_into_tasks():
    bad = {"lmforge.infer.load": {"lmforge.tasks.finetune"}, "lmforge.model.heads": {"lmforge.data.tokenizer"}}
    assert violations(bad) == ["lmforge.infer.load (layer 6) imports lmforge.tasks.finetune (layer 8)",
                               "lmforge.model.heads (layer 3) imports lmforge.data.tokenizer (layer 3)"]


def test_imports_inside_functions_count(tmp_path):
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from lmforge.train import trainer\n    import lmforge.report\n")
    assert imports_of(source, {"lmforge.train.trainer", "lmforge.report"}) == {"lmforge.train.trainer",
                                                                              "lmforge.report"}


def test_the_architecture_page_gives_these_layers():
    """docs/architecture.md's table of layers is the one LAYERS enforces (the page describes the code as it is)."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", page, re.M)
    documented = {f"lmforge.{name.strip(' `/')}": int(number) for number, names in rows for name in names.split(",")}
    assert documented == {package: number for package, number in LAYERS.items() if package != "lmforge"}

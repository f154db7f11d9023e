"""The import direction of the package: cli -> commands -> run -> model, data, config; never back up.

Every module's imports (at the top or inside a function) are read with `ast`, without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

PACKAGE = Path(lmforge.__file__).parent

# A module may import modules of a lower layer, and modules of its own layer in its own package. A module's
# layer is its own entry, else its package's.
LAYERS = {
    "lmforge": 0, "lmforge.errors": 0,
    "lmforge.inputs": 0.5,  # the input-file check: on errors, under config (which reads config files through it)
    "lmforge.files": 1, "lmforge.plots": 1, "lmforge.extras": 1,
    "lmforge.config": 1,
    "lmforge.model": 2, "lmforge.data": 2,
    "lmforge.data.prepare": 3,  # the data writer: the readers (datadir, loader, shards) must not need it
    "lmforge.scratch": 3,
    # task records, chat template, metrics, built-in tasks, the classifier head, LoRA and the fine-tuned model
    # they make: what loading a run (infer/load.py) needs, below it
    "lmforge.tasks": 3,
    "lmforge.run": 4,
    "lmforge.hardware": 4,  # devices, precision, autocast, MFU: inference needs them as much as training
    "lmforge.infer": 5,
    "lmforge.tasks.examples": 5,  # records as masked training examples, their loss (autocast: hardware)
    "lmforge.interop": 6, "lmforge.train": 6,
    "lmforge.lab": 6,  # compare, the teaching plots (which load runs for inference), the report's histograms
    "lmforge.tasks.evaluate": 6, "lmforge.tasks.predict": 6,  # commands on infer: eval --task, predict
    "lmforge.tasks.finetune": 7,  # the fine-tuning loop: drives the torch engine
    "lmforge.serve": 7,  # the HTTP server: the batched engine behind the OpenAI API
    "lmforge.bench": 7,  # times the trainer's engine
    "lmforge.report": 7,  # a fine-tuning run's section evaluates its task (tasks.evaluate)
    "lmforge.lab.sweep": 8,  # drives the trainer and the fine-tuning loop
    "lmforge.arguments": 9,  # each command's flags (the server's limits come from serve.cli)
    "lmforge.cli": 10,
    "lmforge.__main__": 11,
}
# Known exceptions, each to be removed by the change its comment names.
ALLOWED: set[tuple[str, str]] = set()


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
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise KeyError(module)


def top_package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes up, or sideways into another package of the same layer."""
    found = []
    for importer, imported in graph.items():
        for target in imported:
            if (importer, target) in ALLOWED or target == "lmforge" or top_package(target) == top_package(importer) \
                    and layer(target) <= layer(importer):
                continue
            if layer(target) >= layer(importer):
                found.append(f"{importer} (layer {layer(importer)}) imports {target} (layer {layer(target)})")
    return sorted(found)


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(path, set(modules)) for name, path in modules.items()}


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
    assert violations(bad) == ["lmforge.lab.compare (layer 6) imports lmforge.report (layer 7)",
                               "lmforge.run (layer 4) imports lmforge.train.trainer (layer 6)"]


def test_imports_inside_functions_count(tmp_path):
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from lmforge.train import trainer\n    import lmforge.report\n")
    assert imports_of(source, {"lmforge.train.trainer", "lmforge.report"}) == {"lmforge.train.trainer",
                                                                              "lmforge.report"}

"""Install what you use: the core runs without any extra, and a command whose extra is missing says in one line
which `pip install` brings it (lmforge/extras.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.extras import EXTRAS
from tests.conftest import PATIENCE, ROOT, TINY_RUN_TOML, assert_one_line_error, run_cli

# Every optional package, and the ones they bring along that the core must not need either.
OPTIONAL = sorted({package for packages in EXTRAS.values() for package in packages} | {"starlette", "pydantic"})


def cli_without(packages: list[str], *argv: object) -> tuple[int, str, str]:
    """`lmforge ARGV` in a child process in which importing any of `packages` fails, as if not installed."""
    script = ("import sys\n"
              f"for name in {packages!r}:\n"
              "    sys.modules[name] = None  # import fails with ModuleNotFoundError, find_spec finds nothing\n"
              "from lmforge.cli import main\n"
              f"sys.exit(main({[str(arg) for arg in argv]!r}))\n")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=PATIENCE)
    return child.returncode, child.stdout, child.stderr


@pytest.mark.parametrize(("extra", "argv"), [
    ("serve", ["serve", "{root}/run", "--port", "0"]),
    ("tasks", ["finetune", "{root}/run", "--task", "classify", "--data", "{root}/task", "--out", "{root}/out"]),
    ("lab", ["sweep", "--data", "{root}/data", "--out", "{root}/out", "--param", "optim.lr=1e-3,1e-2"]),
    ("gguf", ["export", "{root}/run", "--format", "gguf", "--out", "{root}/out"]),
])
@pytest.mark.parametrize("missing", [0, -1], ids=["first", "last"])
def test_a_command_without_its_extra_names_the_install(extra, argv, missing, tmp_path):
    package = EXTRAS[extra][missing]
    code, out, err = cli_without([package], *(arg.format(root=tmp_path) for arg in argv))
    assert_one_line_error(code, err, f"lmforge {argv[0]}: error:", package, f"pip install 'lmforge[{extra}]'")
    assert out == "" and not (tmp_path / "out").exists()  # refused before any work


def test_an_optional_package_reached_inside_a_command_is_the_same_one_line(monkeypatch, capsys):
    """A command with no extra of its own that reaches an optional package deep inside (a fine-tuned run's
    report scores translations with sacrebleu, say) still ends in the one line naming the extra."""

    def report_scoring_translations(args):
        import sacrebleu  # noqa: F401

    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    monkeypatch.setattr("lmforge.cli.cmd_report", report_scoring_translations)
    code, _, err = run_cli(capsys, "report", "some-run")
    assert_one_line_error(code, err, "lmforge report: error:", "sacrebleu", "pip install 'lmforge[tasks]'")


def test_a_missing_module_that_no_extra_brings_is_still_a_bug(monkeypatch):
    """Only the optional packages become a user error: a missing core module is a traceback, as any bug."""

    def report_needing_numpy(args):
        import numpy  # noqa: F401

    monkeypatch.setitem(sys.modules, "numpy", None)
    monkeypatch.setattr("lmforge.cli.cmd_report", report_needing_numpy)
    with pytest.raises(ModuleNotFoundError):
        main(["report", "some-run"])


def test_importing_the_command_line_imports_no_optional_package():
    script = ("import sys\nimport lmforge.cli\n"
              f"print(sorted(name for name in {OPTIONAL!r} if name in sys.modules))\n")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=PATIENCE)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[]"


def test_the_core_prepares_trains_samples_and_evaluates_without_any_extra(tiny_corpus, tmp_path):
    config, data, run = tmp_path / "tiny.toml", tmp_path / "data", tmp_path / "run"
    config.write_text(TINY_RUN_TOML)
    steps = [
        ["prepare", "--source", tiny_corpus, "--tokenizer", "char", "--val-fraction", "0.2", "--workers", "1",
         "--out", data, "--quiet"],
        ["train", "--config", config, "--data", data, "--out", run, "--quiet", "--max-steps", "10"],
        ["sample", run, "--prompt", "the", "--max-new-tokens", "8", "--device", "cpu"],
        ["eval", run, "--data", data, "--device", "cpu"],
    ]
    outputs = []
    for argv in steps:
        code, out, err = cli_without(OPTIONAL, *argv)
        assert code == 0, err
        outputs.append(out)
    assert outputs[2].startswith("the") and len(outputs[2]) > len("the\n")
    assert json.loads(outputs[3])["loss"] > 0

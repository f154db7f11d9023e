"""Optional dependencies: which extra (`pip install 'lmforge[serve]'`) brings which package, and the one-line
error when a command needs one that is not installed.

The core install prepares data, trains, samples and evaluates; serving, fine-tuning and the hyperparameter
search import their packages inside the code that uses them, so `import lmforge.cli` needs none of them.
"""

from __future__ import annotations

import importlib.util

from lmforge.errors import UserError

# The importable name of each optional package, by the extra (pyproject.toml) that installs it.
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "prometheus_client", "llguidance"),
    "tasks": ("peft", "sklearn", "sacrebleu"),
    "lab": ("optuna",),
    "gguf": ("gguf",),
}


def missing_extra(package: str, extra: str) -> UserError:
    return UserError(f"this needs the '{extra}' extra, and {package} is not installed: "
                     f"pip install 'lmforge[{extra}]'")


def require_extra(extra: str) -> None:
    """Refuse, in one line naming the install, a command whose extra is not (wholly) installed, before it works."""
    for package in EXTRAS[extra]:
        if importlib.util.find_spec(package) is None:
            raise missing_extra(package, extra)


def extra_of(error: ModuleNotFoundError) -> UserError | None:
    """The one-line error for an optional package found missing when imported, or None for any other module."""
    package = (error.name or "").split(".")[0]
    for extra, packages in EXTRAS.items():
        if package in packages:
            return missing_extra(package, extra)
    return None

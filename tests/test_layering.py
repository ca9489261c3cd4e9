"""The dependency rules of docs/architecture.md, checked on the source (imports, including
those inside functions): what each package must not import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "config": {"storage", "models", "data", "infer", "train", "eval", "serve", "cli", "demo", "provenance"},
    "storage": {"models", "data", "infer", "train", "eval", "serve", "cli", "demo", "raycluster", "provenance"},
    "raycluster": {"storage", "models", "data", "infer", "train", "eval", "serve", "cli", "demo", "provenance"},
    "models": {"data", "infer", "train", "eval", "serve", "cli", "demo", "provenance"},
    "data": {"infer", "train", "eval", "serve", "cli", "demo", "provenance"},
    "infer": {"train", "eval", "serve", "cli", "demo"},
    "train": {"infer", "eval", "serve", "cli", "demo"},
    "provenance": {"data", "infer", "train", "eval", "serve", "cli", "demo"},  # raycluster: restore_cwd
    "eval": {"infer", "train", "serve", "cli", "demo"},
    "serve": {"train", "cli", "demo"},
    "report": {"train", "serve", "cli", "demo"},
    "charts": {"config", "storage", "raycluster", "models", "data", "infer", "train", "eval", "serve", "cli", "demo",
               "provenance", "report"},
}


def _medray_imports(path: Path) -> set[str]:
    """The medray subpackages a module imports (absolute `medray.x` or relative `..x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= 2 and node.module:  # from ..x import y, inside medray/<pkg>/
                names = ["medray." + node.module]
            elif node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
        else:
            continue
        found |= {n.split(".")[1] for n in names if n.startswith("medray.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_layering(package):
    base = ROOT / "medray" / package
    files = [base.with_suffix(".py")] if base.with_suffix(".py").exists() else sorted(base.rglob("*.py"))
    bad = {f"{f.relative_to(ROOT)} imports medray.{p}" for f in files for p in _medray_imports(f) & FORBIDDEN[package]}
    assert not bad, sorted(bad)


def test_jobs_depend_on_the_library_not_on_the_cli():
    for f in (ROOT / "jobs").glob("*.py"):
        assert "cli" not in _medray_imports(f), f

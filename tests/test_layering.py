"""The dependency rules of docs/architecture.md, checked on the source (imports, including
those inside functions): what each package must not import."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "config": {"engines", "storage", "models", "data", "infer", "train", "eval", "serve", "cli", "demo", "provenance"},
    "storage": {"engines", "models", "data", "infer", "train", "eval", "serve", "cli", "demo", "raycluster", "provenance"},
    "raycluster": {"engines", "storage", "models", "data", "infer", "train", "eval", "serve", "cli", "demo", "provenance"},
    "localray": {"engines", "config", "storage", "raycluster", "models", "data", "infer", "train", "eval", "serve", "cli", "demo",
                 "provenance"},
    "quiet": {"engines", "config", "storage", "raycluster", "localray", "models", "data", "infer", "train", "eval", "serve",
              "cli", "demo", "provenance"},
    "models": {"engines", "data", "infer", "train", "eval", "serve", "cli", "demo", "provenance"},
    "data": {"engines", "infer", "train", "eval", "serve", "cli", "demo", "provenance"},
    "engines": {"data", "infer", "train", "eval", "serve", "cli", "demo", "provenance", "report"},
    "infer": {"train", "eval", "serve", "cli", "demo"},
    "train": {"engines", "infer", "eval", "serve", "cli", "demo"},
    "lineage": {"engines", "data", "infer", "train", "eval", "serve", "cli", "demo", "report"},
    "provenance": {"lineage", "engines", "data", "infer", "train", "eval", "serve", "cli", "demo"},  # raycluster: restore_cwd
    "eval": {"engines", "infer", "train", "serve", "cli", "demo"},
    "serve": {"train", "cli", "demo"},
    "report": {"train", "serve", "cli", "demo"},
    "pages": {"train", "serve", "cli", "demo", "report"},
    "digests": {"engines", "config", "storage", "raycluster", "models", "data", "infer", "train", "eval", "serve", "cli", "demo",
                "provenance", "report", "charts"},
    "charts": {"engines", "config", "storage", "raycluster", "models", "data", "infer", "train", "eval", "serve", "cli", "demo",
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


# What a command that builds or checks configs uses, and the Serve ingress's module: none of
# it may load torch or transformers (medray._lazy). Run in a fresh interpreter, since this
# one has them loaded already.
LIGHT = """
import sys
from medray.cli import build_parser
build_parser().parse_args(["tiny-model", "--family", "llava-mistral", "--out", "x"])
from medray.train import load_manifest
load_manifest("manifests/tiny/llava-med.yaml", ["output=/tmp/unused"])
from medray.infer import GenerationSettings, InferConfig
from medray.engines import ENGINES, EngineName, choose
InferConfig(model="tiny://llava-mistral", input="s3://b/in/", output="s3://b/out/")
from medray.serve import ServeConfig
import medray.serve.app  # the ingress deployment's module
from medray.data import load_image, read_records
heavy = sorted(m for m in ("torch", "transformers", "peft", "vllm", "ray.train", "ray.data") if m in sys.modules)
assert not heavy, heavy
"""


def test_config_parsing_and_the_ingress_load_no_torch():
    run = subprocess.run([sys.executable, "-c", LIGHT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("package", ["medray.data", "medray.engines", "medray.infer", "medray.models", "medray.serve", "medray.train"])
def test_every_lazily_exported_name_resolves(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        assert value is getattr(module, name)  # kept in the package after the first look-up
        assert name in dir(module)
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        module.nonexistent  # noqa: B018

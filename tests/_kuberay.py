"""Test helpers for kuberay/: a kustomize renderer for the features the repo uses, and CRD
validation as an API server with strict field validation does it.

The renderer covers resources, JSON6902 patches (inline or from a file, with a target) and
replacements, applied in kustomize's order (patches before replacements). Where kubectl is
installed, tests/test_kuberay.py checks it renders exactly what `kubectl kustomize` does.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonpatch
import yaml


def _matches(resource: dict, selector: dict) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": resource["kind"], "name": resource["metadata"]["name"]}
    return all(want.get(k) == v for k, v in selector.items() if k in want)


def _get(node, dotted: str):
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(node, dotted: str, value) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = copy.deepcopy(value)


def render(directory: Path) -> list[dict]:
    """The resources `kubectl kustomize <directory>` would print."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches", "replacements"}
    assert not unknown, f"{directory}: the test renderer does not know {unknown}"
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load(patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text())
        hits = [r for r in resources if _matches(r, patch["target"])]
        assert hits, f"{directory}: patch target {patch['target']} matches nothing"
        for i, r in enumerate(resources):
            if r in hits:
                resources[i] = jsonpatch.apply_patch(r, ops)
    for rep in kustomization.get("replacements", []):
        src = rep["source"]
        [source] = [r for r in resources if _matches(r, {k: v for k, v in src.items() if k != "fieldPath"})]
        value = _get(source, src["fieldPath"])
        for target in rep["targets"]:
            for r in resources:
                if _matches(r, target["select"]):
                    for path in target["fieldPaths"]:
                        _set(r, path, value)
    return resources


# ------------------------------------------------------------------------------ CRD schemas
def _strict(schema: dict) -> dict:
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema that rejects unknown fields."""
    schema = dict(schema)
    if schema.pop("x-kubernetes-int-or-string", False):
        schema.pop("type", None)
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False  # the API server's strict field validation
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _strict(schema["additionalProperties"])
    if "items" in schema:
        schema["items"] = _strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


METADATA = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


def validators(crd_dir: Path) -> dict:
    """(apiVersion, kind) -> a jsonschema validator for that custom resource."""
    from jsonschema import Draft202012Validator

    out = {}
    for path in sorted(crd_dir.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        kind = crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = METADATA
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
            out[(f"{crd['spec']['group']}/{version['name']}", kind)] = Draft202012Validator(schema)
    return out


def errors(validator_map: dict, resource: dict) -> list[str]:
    key = (resource.get("apiVersion"), resource.get("kind"))
    if key not in validator_map:
        return [f"no CRD for {key}"]
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in validator_map[key].iter_errors(resource)]

"""cluster/ and the Dockerfile: the launcher config validates against Ray's own schema, the
runtime_env files are accepted by Ray, and the image holds what the entrypoints name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from medray.raycluster import SERVE_FAST_PATH_ENV

REPO = Path(__file__).resolve().parents[1]


def test_launcher_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for t in types.values() if re.match(r"^(g5|g6|p4d|p5)\.", t["node_config"]["InstanceType"])]
    assert len(gpu_types) >= 2 and all(t["min_workers"] == 0 for t in gpu_types)  # GPUs only on demand
    assert config["idle_timeout_minutes"] > 0
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())  # S3 without keys on disk


def test_every_launched_node_runs_with_token_auth_and_the_launchers_token():
    """Under token auth a node without the token cannot start or join: the containers run with
    RAY_AUTH_MODE=token, `ray up` copies the token it was run with, and the README makes it."""
    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # and Serve's fast path, as KubeRay's pods
    assert all(f"--env {k}={v}" in config["docker"]["run_options"] for k, v in SERVE_FAST_PATH_ENV.items())
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    readme = (REPO / "cluster" / "README.md").read_text()
    assert readme.index("ray get-auth-token --generate") < readme.index("\nray up cluster/aws-gpu.yaml")  # the command, not the list
    assert "RAY_AUTH_MODE=token" in readme


def test_runtime_env_files_are_accepted_by_ray_and_ship_the_entrypoints():
    from ray.runtime_env import RuntimeEnv

    for path in sorted((REPO / "cluster" / "runtime_env").glob("*.yaml")):
        env = yaml.safe_load(path.read_text())
        RuntimeEnv(**env)
        assert env["working_dir"] == "."
        assert not any(e.startswith(("jobs", "manifests", "medray")) for e in env.get("excludes", [])), path


def test_dockerfile_builds_on_rayproject_ray_and_copies_what_the_jobs_run():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_TAG=[\w.-]+-gpu$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{BASE_TAG\}$", text, re.M)
    copied = [src for line in re.findall(r"^COPY (.+)$", text, re.M)
              for src in [w for w in line.split() if not w.startswith("--")][:-1]]
    for source in copied:
        assert (REPO / source).exists(), source
    assert {"jobs", "manifests", "medray", "pyproject.toml"} <= set(copied)
    assert "WORKDIR /home/ray/medray" in text

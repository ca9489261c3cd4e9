"""kuberay/: every rendered resource validates against the KubeRay CRDs (strictly), names
only files that exist, carries the serve config unchanged, and asks for capacity the cluster
can grow to."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from _kuberay import errors, render, validators
from medray.raycluster import SERVE_FAST_PATH_ENV
from medray.serve import ServeConfig
from medray.train import load_manifest

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = sorted(p.parent for p in (REPO / "kuberay" / "overlays").glob("*/kustomization.yaml"))
CRDS = Path(os.environ.get("MEDRAY_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))


@pytest.fixture(scope="module")
def crd_validators():
    # The CRDs are not vendored into the repo; they sit beside it (or where the env var says).
    if not any(CRDS.glob("ray.io_*.yaml")):
        pytest.skip(f"no KubeRay CRDs in {CRDS}: set MEDRAY_KUBERAY_CRDS to the directory of "
                    "ray-operator/config/crd/bases from ray-project/kuberay")
    return validators(CRDS)


def test_the_overlays_are_cpu_dev_and_gpu_prod():
    assert [p.name for p in OVERLAYS] == ["cpu-dev", "gpu-prod"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_resource_validates_strictly_against_the_crds(overlay, crd_validators):
    resources = render(overlay)
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == ["RayCluster"] + ["RayJob"] * 5 + ["RayService"]
    for r in resources:
        assert errors(crd_validators, r) == [], (overlay.name, r["kind"], r["metadata"]["name"])


def test_the_validator_rejects_what_an_api_server_would(crd_validators):
    [cluster] = [r for r in render(OVERLAYS[0]) if r["kind"] == "RayCluster"]
    unknown = yaml.safe_load(yaml.safe_dump(cluster))
    unknown["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # a typo
    assert any("maxReplica" in e for e in errors(crd_validators, unknown))
    wrong_type = yaml.safe_load(yaml.safe_dump(cluster))
    wrong_type["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "three"
    assert any("maxReplicas" in e for e in errors(crd_validators, wrong_type))
    missing = yaml.safe_load(yaml.safe_dump(cluster))
    del missing["spec"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in errors(crd_validators, missing))
    bad_container = yaml.safe_load(yaml.safe_dump(cluster))
    bad_container["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy2"] = "x"
    assert any("imagePullPolicy2" in e for e in errors(crd_validators, bad_container))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_test_renderer_matches_kubectl_kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True).stdout
    key = lambda r: (r["kind"], r["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(render(overlay), key=key)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_ray_cluster_runs_with_token_authentication(overlay):
    """Ray 2.60 starts a head under token auth: the operator must make the token and hand it
    to every container (authOptions), and no container may set its own mode or token over it."""
    for r in render(overlay):
        spec = {"RayCluster": r["spec"], "RayJob": r["spec"].get("rayClusterSpec"),
                "RayService": r["spec"].get("rayClusterConfig")}[r["kind"]]
        assert spec["authOptions"] == {"mode": "token"}, (r["kind"], r["metadata"]["name"])
        assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52)  # authOptions needs it
        groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                names = {e["name"] for e in container.get("env", [])}
                assert not names & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}, container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_every_ray_container_runs_serve_s_fast_path(overlay):
    """Serve's HAProxy ingress is chosen per node when its Ray starts: every container of every
    cluster (the RayService's, where it serves, and the RayJobs') sets what medray's own local
    instances set (medray.raycluster.SERVE_FAST_PATH_ENV)."""
    for r in render(overlay):
        spec = {"RayCluster": r["spec"], "RayJob": r["spec"].get("rayClusterSpec"),
                "RayService": r["spec"].get("rayClusterConfig")}[r["kind"]]
        for group in [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", []):
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert {k: env.get(k) for k in SERVE_FAST_PATH_ENV} == SERVE_FAST_PATH_ENV, \
                    (r["kind"], r["metadata"]["name"], container["name"])


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_entrypoints_and_configs_name_files_in_the_repo(overlay):
    for r in render(overlay):
        if r["kind"] == "RayJob":
            words = shlex.split(r["spec"]["entrypoint"])
            assert words[0] == "python" and (REPO / words[1]).is_file(), words
            for word in words[2:]:
                if word.startswith(("manifests/", "jobs/")):
                    assert (REPO / word).is_file(), word
                    load_manifest(str(REPO / word), [s for w, s in zip(words, words[1:]) if w == "--set"])
            assert yaml.safe_load(r["spec"]["runtimeEnvYAML"])["env_vars"]
        if r["kind"] == "RayService":
            assert (REPO / r["metadata"]["annotations"]["medray.io/serve-config"]).is_file()


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_the_rayservice_carries_the_serve_config_unchanged(overlay):
    [service] = [r for r in render(overlay) if r["kind"] == "RayService"]
    source = yaml.safe_load((REPO / service["metadata"]["annotations"]["medray.io/serve-config"]).read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded["applications"] == source["applications"]
    assert embedded["http_options"] == {"host": "0.0.0.0", "port": 8000}  # the pod's address
    for app in embedded["applications"]:
        ServeConfig.model_validate(app["args"])


def _group_capacity(cluster: dict, resource: str) -> float:
    total = 0.0
    for group in cluster["spec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        value = str(limits.get(resource, "0"))
        total += group["maxReplicas"] * (float(value[:-1]) / 1000 if value.endswith("m") else float(value))
    return total


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_serve_and_worker_autoscaling_fit_together(overlay):
    """What Serve may scale to, and what each training stage asks for, fits in what the
    worker groups can scale to: a pending replica or worker gets a node, never waits forever."""
    resources = render(overlay)
    [cluster] = [r for r in resources if r["kind"] == "RayCluster"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    gpus, cpus = _group_capacity(cluster, "nvidia.com/gpu"), _group_capacity(cluster, "cpu")
    [service] = [r for r in resources if r["kind"] == "RayService"]
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        config = ServeConfig.model_validate(app["args"])
        need_gpus = sum(m.autoscaling.max_replicas * m.gpus_per_replica for m in config.models)
        need_cpus = sum(m.autoscaling.max_replicas * m.cpus_per_replica for m in config.models) + \
            config.ingress.max_replicas * config.ingress.cpus_per_replica
        assert need_gpus <= gpus and need_cpus <= cpus, (overlay.name, need_gpus, gpus, need_cpus, cpus)
        assert all(m.autoscaling.max_replicas > m.autoscaling.min_replicas for m in config.models)
        # GPU deployments serve on vLLM; the CPU dev overlay on the embedded engine.
        assert {m.engine for m in config.models} == ({"vllm"} if gpus else {"hf"}), overlay.name
    for job in (r for r in resources if r["kind"] == "RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"]
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        words = shlex.split(job["spec"]["entrypoint"])
        if words[1] == "jobs/train.py":
            sets = [s for w, s in zip(words, words[1:]) if w == "--set"]
            for stage in load_manifest(str(REPO / words[2]), sets).stages:
                assert stage.workers * stage.gpus_per_worker <= gpus, (job["metadata"]["name"], stage.name)
        if words[1] == "jobs/infer.py":  # the flags as jobs/infer.py parses them
            import argparse

            from medray.infer import add_infer_arguments, infer_config_from_args

            parser = argparse.ArgumentParser()
            add_infer_arguments(parser)
            infer = infer_config_from_args(parser.parse_args(words[2:]))
            assert infer.max_actors * infer.gpus_per_actor <= max(gpus, 0) or not infer.gpus_per_actor
            # GPU deployments generate on vLLM; the CPU dev overlay on the embedded engine.
            assert infer.engine == ("vllm" if gpus else "hf"), (overlay.name, infer.engine)

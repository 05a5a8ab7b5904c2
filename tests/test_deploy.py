"""The deployment files parse and hold what a cluster needs to run `embedstore ingest` (checked
here, not by deploying)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def mounts_data(pod_template: dict) -> bool:
    mounted = {m["mountPath"] for c in containers(pod_template) for m in c.get("volumeMounts", [])}
    claims = [v for v in pod_template["spec"].get("volumes", []) if "persistentVolumeClaim" in v]
    return "/data" in mounted and bool(claims)


def dockerfile_ray_version() -> str:
    return re.search(r'"ray\[default\]==([\d.]+)"', (DEPLOY / "Dockerfile").read_text()).group(1)


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == dockerfile_ray_version()  # KubeRay needs the image's Ray version
    head = spec["headGroupSpec"]["template"]
    assert containers(head)[0]["image"] == "embedstore:latest" and mounts_data(head)
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu") == "1"]
    assert gpu_groups, "no worker group with one GPU per pod"
    for group in gpu_groups:
        assert group["replicas"] >= 1 and group["maxReplicas"] >= group["replicas"]
        assert containers(group["template"])[0]["image"] == "embedstore:latest" and mounts_data(group["template"])


def test_raycluster_manifest():
    manifest = load("kuberay/raycluster.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(manifest["spec"])


def test_rayjob_runs_embedstore_ingest_against_the_shared_store():
    manifest = load("kuberay/rayjob.yaml")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    entrypoint = manifest["spec"]["entrypoint"]
    assert entrypoint.startswith("embedstore ingest ") and "--ray-address auto" in entrypoint
    assert "--store /data/" in entrypoint
    assert manifest["spec"]["shutdownAfterJobFinishes"] is True
    check_cluster_spec(manifest["spec"]["rayClusterSpec"])


def test_the_s3_rayjob_keeps_archive_and_store_in_buckets_and_credentials_in_a_secret():
    manifest = load("kuberay/rayjob-s3.yaml")
    entrypoint = manifest["spec"]["entrypoint"]
    assert re.match(r"embedstore ingest s3://\S+ --store s3://\S+ ", entrypoint) and "--ray-address auto" in entrypoint
    assert "AWS_" not in entrypoint and "EMBEDSTORE_PATIENT_ID_KEY" not in entrypoint  # Ray lists entrypoints
    cluster = manifest["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == dockerfile_ray_version()
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        assert containers(template)[0]["envFrom"] == [{"secretRef": {"name": "embedstore-s3"}}]
        assert not mounts_data(template)  # no shared file system: the store is in the bucket


def test_cluster_launcher_config():
    config = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker"):
        assert key in config, key
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert any(t["resources"].get("GPU", 0) >= 1 and t.get("max_workers", 0) >= 1 for t in node_types.values())
    assert config["docker"]["image"] == "embedstore:latest"


def test_dockerfile_builds_embedstore_with_tensorrt_on_cuda():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM \S*(pytorch|cuda)\S*", text, re.MULTILINE)
    assert '".[tensorrt]"' in text and "EMBEDSTORE_ENGINE_CACHE" in text


def test_the_guide_names_every_file():
    guide = (DEPLOY / "README.md").read_text()
    for name in ("Dockerfile", "kuberay/rayjob.yaml", "kuberay/rayjob-s3.yaml", "kuberay/raycluster.yaml",
                 "ray-cluster.yaml", "vacuum"):
        assert name in guide, name

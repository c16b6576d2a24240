"""The deployment files parse, name the code's import path, and pass its own argument checks."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import ray
import yaml
from packaging.version import Version
from ray.serve.schema import ServeDeploySchema

from csm.cluster import app
from csm.cluster.options import parse_options

REPOSITORY = Path(__file__).resolve().parents[2]


def _check_serve_config(config: dict) -> list[dict]:
    """Serve's own schema, then each application's import path and arguments; the applications."""
    ServeDeploySchema.model_validate(config)
    applications = config["applications"]
    for application in applications:
        module, name = application["import_path"].split(":")
        assert getattr(importlib.import_module(module), name) is app
        app(application["args"])  # checks every argument; builds, loads nothing
    return applications


def test_the_serve_config_deploys_the_builder_with_valid_arguments():
    config = yaml.safe_load((REPOSITORY / "deploy/ray/serve.yaml").read_text())
    (application,) = _check_serve_config(config)
    options = parse_options(application["args"])
    assert options.replica_gpus == 1 and options.device == "cuda" and options.autoscaling


def test_the_rayservice_has_a_cpu_head_a_gpu_worker_group_and_the_application():
    service = yaml.safe_load((REPOSITORY / "deploy/kubernetes/rayservice.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    (application,) = _check_serve_config(yaml.safe_load(service["spec"]["serveConfigV2"]))
    options = parse_options(application["args"])
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == options.replica_gpus and float(container["resources"]["limits"]["cpu"]) >= options.replica_cpus
    assert workers["maxReplicas"] * gpus >= options.max_replicas * options.replica_gpus  # room for every replica
    for group in (cluster["headGroupSpec"], workers):
        mounts = {mount["mountPath"] for c in group["template"]["spec"]["containers"] for mount in c["volumeMounts"]}
        assert options.voices_dir in mounts  # every pod reads the same voices


def test_the_ray_the_files_name_meets_the_extra():
    pyproject = (REPOSITORY / "pyproject.toml").read_text()
    (minimum,) = re.findall(r'^ray = \["ray\[serve\]>=([\d.]+)"\]$', pyproject, re.MULTILINE)
    assert Version(ray.__version__) >= Version(minimum)


def test_the_dockerfile_installs_this_checkout_with_serve_and_ray_for_cpu_or_cuda():
    dockerfile = (REPOSITORY / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile, re.MULTILINE)
    assert "cpu) index=https://download.pytorch.org/whl/cpu" in dockerfile and "cuda) index=" in dockerfile
    assert "COPY src ./src" in dockerfile and "pip install --no-cache-dir '.[serve,ray]'" in dockerfile
    torch_pin = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.MULTILINE).group(1)
    assert f"torch=={torch_pin}" in (REPOSITORY / "scripts/test").read_text()

"""The application's arguments: typed from Serve's strings or YAML values, refused by name
before anything loads (no Ray cluster is started here: building the application loads nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray.serve import Application

import csm
from csm.cluster import app
from csm.cluster.application import engine_deployment, target_ongoing_requests
from csm.cluster.options import ClusterOptions, parse_options


def test_strings_from_the_command_line_become_typed_options():
    options = parse_options(
        {
            "model": "/models/csm", "num_replicas": "2", "replica_cpus": "0.5", "replica_gpus": "0",
            "watermark": "false", "max_batch": "4", "max_queue": "3", "dtype": "bf16", "quantize": "int8",
            "compile": "true", "device": "cpu",
        }
    )  # fmt: skip
    assert options == ClusterOptions(
        model="/models/csm", num_replicas=2, replica_cpus=0.5, watermark=False, max_batch=4, max_queue=3,
        dtype="bf16", quantize="int8", compile=True, device="cpu",
    )  # fmt: skip
    assert options.watermarking is False and not options.autoscaling


def test_yaml_values_and_the_watermark_key():
    options = parse_options(
        {"min_replicas": 0, "max_replicas": 3, "replica_gpus": 1, "watermark_key": "1,2,3,4,5", "upscale_delay_s": 5}
    )
    assert options.autoscaling and options.min_replicas == 0 and options.replica_gpus == 1.0
    assert (options.upscale_delay_s, options.downscale_delay_s) == (5.0, 600.0)
    assert options.watermarking == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"modle": "x"}, "unknown argument(s) modle"),
        ({"num_replicas": "two"}, "num_replicas: expected a whole number, got 'two'"),
        ({"num_replicas": "0"}, "num_replicas: must be at least 1, got 0"),
        ({"max_queue": "0"}, "max_queue: must be at least 1, got 0"),
        ({"replica_cpus": "-1"}, "replica_cpus: must be a finite number at least 0"),
        ({"replica_gpus": "nan"}, "replica_gpus: must be a finite number at least 0"),
        ({"watermark": "maybe"}, "watermark: expected true or false, got 'maybe'"),
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"device": "tpu"}, "device: unknown device 'tpu'"),
        ({"quantize": "int3"}, "quantize: 'int3' is not one of int8, int8-dynamic, int4"),
        ({"watermark_key": "1,2,3"}, "watermark_key: expected 5 comma-separated bytes"),
        ({"model": ""}, "model: expected a non-empty string"),
        ({"num_replicas": "2", "max_replicas": "4"}, "give num_replicas (a fixed count) or min_replicas/max_replicas"),
        ({"min_replicas": "3", "max_replicas": "2"}, "min_replicas (3) is above max_replicas (2)"),
        ({"upscale_delay_s": "soon"}, "upscale_delay_s: expected a number, got 'soon'"),
        ({"downscale_delay_s": "-1"}, "downscale_delay_s: must be a finite number at least 0"),
        ({"num_replicas": "2", "downscale_delay_s": "60"}, "downscale_delay_s: autoscaling delays, but num_replicas fixes the count"),
        ({"device": "cuda"}, "device cuda needs replica_gpus"),
        ({"device": "cpu", "replica_gpus": "1"}, "reserves GPUs that device cpu leaves idle"),
        ({"watermark": "false", "watermark_key": "1,2,3,4,5"}, "watermark_key is given but watermark is false"),
    ],
)
def test_bad_arguments_are_refused_by_name_before_anything_loads(args, message):
    with pytest.raises(ValueError) as raised:
        app(args)  # the builder itself: what `serve run csm.cluster:app ...` calls first
    assert message in str(raised.value)


def test_the_builder_returns_the_application_with_its_admission_and_autoscaling():
    assert isinstance(app({"num_replicas": "2", "replica_cpus": "0.5"}), Application)
    fixed = engine_deployment(parse_options({"num_replicas": "2", "max_batch": "8", "max_queue": "16"}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 8 and fixed["max_queued_requests"] == 16
    scaled = engine_deployment(parse_options({"max_replicas": "6", "replica_gpus": "1", "device": "cuda"}))
    assert scaled["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    autoscaling = scaled["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 6)
    assert autoscaling["target_ongoing_requests"] == target_ongoing_requests(8) == 6
    assert (autoscaling["upscale_delay_s"], autoscaling["downscale_delay_s"]) == (30.0, 600.0)
    quick = engine_deployment(parse_options({"upscale_delay_s": "5", "downscale_delay_s": "120.5"}))["autoscaling_config"]
    assert (quick["upscale_delay_s"], quick["downscale_delay_s"]) == (5.0, 120.5)


def test_serve_run_refuses_a_bad_argument_before_starting_ray():
    """Ray's own CLI (`serve`) passes the key=value arguments to the builder, whose message it shows."""
    source = str(Path(csm.__file__).resolve().parents[1])
    environment = {**os.environ, "PYTHONPATH": source, "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, "-c", "from ray.serve.scripts import cli; cli()", "run", "csm.cluster:app", "modle=x"],
        env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "ValueError: unknown argument(s) modle: csm.cluster:app takes model, mimi" in result.stderr + result.stdout
    assert "Started a local Ray instance" not in result.stderr + result.stdout

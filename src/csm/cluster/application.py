"""The Ray Serve application: an ingress, engine replicas and the board of their reports.

`app` is an application builder: Serve's CLI calls it with the `key=value` arguments of
`serve run csm.cluster:app ...`, and `serve deploy` with a config file's `args`. The engine
deployment takes `max_batch` requests per replica (its rows) and keeps at most `max_queue`
waiting at each ingress; past that a request is answered 429 with `Retry-After`. Without
`num_replicas`, Serve autoscales the engine replicas between `min_replicas` and `max_replicas`
on the requests they hold (`autoscaling_config`), after `upscale_delay_s` of load above the
target or `downscale_delay_s` below it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ray import serve
from ray.serve import Application

from csm.cluster.board import EngineBoard
from csm.cluster.ingress import Ingress
from csm.cluster.options import ClusterOptions, parse_options
from csm.cluster.replica import SpeechEngine

# The ingress only parses, encodes and relays: it holds many streams at once.
INGRESS_MAX_ONGOING = 1024


def app(args: Mapping[str, object]) -> Application:
    """The csm application from its arguments (see `csm.cluster.options.ARGUMENTS`); a
    `ValueError` names a bad argument before anything loads."""
    options = parse_options(args)
    board = serve.deployment(
        EngineBoard, name="EngineBoard", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        logging_config={"enable_access_log": False},  # every replica reports twice a second
    ).bind()  # fmt: skip
    engines = serve.deployment(SpeechEngine, name="SpeechEngine", **engine_deployment(options)).bind(options, board)
    ingress = serve.deployment(
        serve.ingress()(Ingress), name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
    )  # fmt: skip
    return ingress.bind(options, engines, board)


def engine_deployment(options: ClusterOptions) -> dict:
    """The engine deployment's Serve options: resources, admission and replica count or autoscaling."""
    deployment = {
        "ray_actor_options": {"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        "max_ongoing_requests": options.max_batch,
        "max_queued_requests": options.max_queue,
    }
    if options.num_replicas is not None:
        deployment["num_replicas"] = options.num_replicas
    else:
        deployment["autoscaling_config"] = {
            "min_replicas": options.min_replicas,
            "initial_replicas": max(1, options.min_replicas),
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": target_ongoing_requests(options.max_batch),
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
        }
    return deployment


def target_ongoing_requests(max_batch: int) -> int:
    """Three quarters of the rows: a replica scales out before its rows are all taken."""
    return max(1, math.ceil(0.75 * max_batch))

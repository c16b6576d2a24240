"""csm on Ray Serve: `csm serve`'s HTTP API over engine replicas on many GPUs or machines.

    serve run csm.cluster:app model=sesame/csm-1b num_replicas=2 replica_gpus=1

`app` builds the application (`csm.cluster.application`): an ingress running `csm serve`'s
routes (`csm.cluster.ingress`), engine replicas holding the model and its continuous-batching
engine (`csm.cluster.replica`), and a board of the replicas' figures (`csm.cluster.board`).
Arguments are checked by `csm.cluster.options`. Needs the `serve` and `ray` extras:
`pip install 'csm-torch[serve,ray]'`.
"""

from csm.cluster.application import app

__all__ = ["app"]

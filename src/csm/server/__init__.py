"""`csm serve`: an OpenAI-compatible speech server over the continuous-batching engine.

Modules, in the order a request flows: `protocol` (the request and response schema),
`auth` and `errors` (who may call, and OpenAI's error envelope), `voices` (built-in,
OpenAI-named and uploaded voices), `uploads` (reading audio sent by clients), `speech`
(text to audio chunks through the engine, time stretch, watermark), `backend` (what the
routes run on: this process's engine, or `csm.cluster`'s replicas), `encoding` (audio
formats), `app` (the routes) and `main` (the process: loading, logging, shutdown). Needs
the `serve` extra: `pip install 'csm[serve]'`.
"""

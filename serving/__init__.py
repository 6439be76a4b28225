"""Serving: an HTTP image API over SprintPipeline on Ray Serve (one machine or a cluster).

It imports the runtime; nothing imports it. Its dependencies (ray[serve]) are the `serve` extra, so a
box that only runs engines never installs Ray. `api.py` is plain Python (request parsing, batching
rules, error mapping) and is tested without Ray; `app.py` is the Ray Serve deployment.
"""

"""`sprintrt serve`: the image API as a Ray Serve application (local Ray by default, or a cluster).

One deployment, `SprintServer`, with a FastAPI ingress; each replica loads SprintPipeline.from_engines
once. Requests are checked by the runtime's own checks on arrival (bad ones get a 4xx at once), then
wait in Ray Serve's batcher (`@serve.batch`: up to --max-batch images or --max-wait-ms); requests of
a batch that share a size and schedule run as one engine call. A bounded queue per replica answers
503 with Retry-After when full; a request that waits past --timeout-s gets a 503 too. Ray Serve
restarts a replica that dies and drains in-flight requests on shutdown.
"""


import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from sprintrt import defaults as D
from sprintrt.serving import api

# Stages reported in the latency histogram (SprintPipelineOutput.timings' names).
STAGES = ("tokenize", "text_encoder", "transformer", "noise", "scheduler", "vae_decoder", "postprocess", "total")


@dataclass(frozen=True)
class ServeOptions:
    engine_dir: str
    max_batch: int = D.DEFAULT_MAX_BATCH  # images per engine call (at most the engines' batch profile)
    max_wait_ms: float = D.SERVE_MAX_WAIT_MS  # how long the batcher waits to fill a batch
    max_queued: int = D.SERVE_MAX_QUEUED  # requests admitted per replica (running + waiting); more get 503
    timeout_s: float = D.SERVE_TIMEOUT_S  # per request, from arrival to answer
    replicas: int = 1
    num_gpus: float = 0.0  # per replica (1 for one replica per GPU)
    threads: int | None = None  # engine threads per replica

    def check(self) -> None:
        from sprintrt.errors import invalid

        for name, low in (("max_batch", 1), ("max_queued", 1), ("replicas", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise invalid(name, v, f"an integer >= {low}", f"pass --{name.replace('_', '-')} {max(low, 1)}")
        for name in ("max_wait_ms", "timeout_s", "num_gpus"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or (name == "timeout_s" and v == 0):
                raise invalid(name, v, "a non-negative number" + (" > 0" if name == "timeout_s" else ""),
                              f"pass e.g. --{name.replace('_', '-')} 10")
        if not (Path(self.engine_dir) / "manifest.json").is_file():
            from sprintrt.errors import EngineDirError

            raise EngineDirError(f"{self.engine_dir!r} has no manifest.json. Fix: build engines with `sprintrt build "
                                 f"ONNX_DIR -o {self.engine_dir}`")


class Metrics:
    """Prometheus metrics of one replica (its own registry: /metrics shows the replica that answers)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("sprintrt_requests", "Requests answered, by HTTP status", ["status"],
                                registry=self.registry)
        self.queue = Gauge("sprintrt_queue_length", "Requests admitted and not yet answered", registry=self.registry)
        self.batch_images = Histogram("sprintrt_batch_images", "Images per engine call",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=self.registry)
        self.stage = Histogram("sprintrt_stage_seconds", "Seconds per pipeline stage per engine call", ["stage"],
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                               registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Server:
    """What one replica does, without Ray: admit, check, batch-run, answer. The Ray Serve deployment
    below wraps it; tests may drive it directly."""

    def __init__(self, options: ServeOptions):
        from sprintrt.runtime.pipeline import SprintPipeline

        self.options = options
        self.pipe = SprintPipeline.from_engines(options.engine_dir, threads=options.threads)
        self.pipe.cache_instruction()  # the default instruction's text-encoder prefix, before the first request
        engine_batch = self.pipe.limits["transformer"]["batch"].max
        self.max_images = min(options.max_batch, engine_batch)
        self.metrics = Metrics()
        self.admitted = 0
        self.engine_calls: list[int] = []  # images per engine call, for tests and logs
        self._lock = threading.Lock()  # one engine call at a time per replica

    def admit(self) -> None:
        if self.admitted >= self.options.max_queued:
            raise api.ApiError(503, f"the server is at capacity ({self.admitted} requests queued or running, "
                                    f"max_queued={self.options.max_queued}). Fix: retry after the Retry-After delay, "
                                    "or add replicas", retry_after_s=max(1.0, self.options.max_wait_ms / 1000))
        self.admitted += 1
        self.metrics.queue.set(self.admitted)

    def release(self) -> None:
        self.admitted -= 1
        self.metrics.queue.set(self.admitted)

    def run_batch(self, requests: list[api.GenerationRequest]) -> list[dict]:
        """Run admitted, checked requests: one engine call per group of equal batch keys (chunked to the
        images an engine call may hold). Returns one response body per request, in order."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[req.batch_key()].append(i)
        bodies: list = [None] * len(requests)
        for indices in groups.values():
            chunk: list[int] = []
            for i in indices + [None]:
                if i is not None and sum(requests[j].n for j in chunk) + requests[i].n <= self.max_images:
                    chunk.append(i)
                    continue
                if chunk:
                    self._run_chunk(requests, chunk, bodies)
                chunk = [i] if i is not None else []
        return bodies

    def _run_chunk(self, requests, chunk: list[int], bodies: list) -> None:
        reqs = [requests[i] for i in chunk]
        images = sum(r.n for r in reqs)
        with self._lock:
            out = self.pipe(**api.batch_call(reqs), output_type="pil")
        self.engine_calls.append(images)
        self.metrics.batch_images.observe(images)
        for stage in STAGES:
            if stage in out.timings:
                v = out.timings[stage]
                self.metrics.stage.labels(stage).observe(sum(v) if isinstance(v, list) else v)
        created, k = int(time.time()), 0
        timings = {s: (round(sum(v), 4) if isinstance(v, list) else round(v, 4)) for s, v in out.timings.items()}
        for i, req in zip(chunk, reqs):
            bodies[i] = api.response_body(req, out.images[k:k + req.n], created, timings, images)
            k += req.n


def create_deployment(options: ServeOptions):
    """The Ray Serve deployment (class) for these options; `.bind()` it to get the application."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from ray import serve

    app = FastAPI(title="sprintrt", description="SANA-Sprint images over sprintrt engines")

    @serve.deployment(name="SprintServer", num_replicas=options.replicas,
                      ray_actor_options={"num_gpus": options.num_gpus, "num_cpus": 0},
                      max_ongoing_requests=options.max_queued + options.max_batch,
                      graceful_shutdown_timeout_s=max(30.0, options.timeout_s),
                      health_check_period_s=5.0)
    @serve.ingress(app)
    class SprintServer:
        def __init__(self, opts: dict):
            self.server = Server(ServeOptions(**opts))

        @app.get("/health")
        def health(self):
            return {"status": "live"}

        @app.get("/ready")
        def ready(self):
            return {"status": "ready", "engine_dir": self.server.options.engine_dir,
                    "max_images_per_call": self.server.max_images}

        @app.get("/metrics")
        def metrics(self):
            return Response(self.server.metrics.text(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/stats")
        def stats(self):
            return {"engine_calls": list(self.server.engine_calls), "admitted": self.server.admitted}

        @app.post(api.ROUTE)
        async def generate(self, request: Request):
            t0 = time.perf_counter()
            try:
                req = api.parse_request(await request.body())
                api.check_with_pipeline(self.server.pipe, req)
                self.server.admit()
                try:
                    remaining = self.server.options.timeout_s - (time.perf_counter() - t0)
                    body = await asyncio.wait_for(self._batched(req), timeout=max(remaining, 0.001))
                finally:
                    self.server.release()
            except api.ApiError as e:
                self.server.metrics.requests.labels(str(e.status)).inc()
                return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
            except asyncio.TimeoutError:
                e = api.ApiError(503, f"the request did not finish within timeout_s={self.server.options.timeout_s} s. "
                                      "Fix: retry later, or ask for fewer or smaller images", retry_after_s=5)
                self.server.metrics.requests.labels("503").inc()
                return JSONResponse(e.body(), status_code=503, headers=e.headers())
            self.server.metrics.requests.labels("200").inc()
            return JSONResponse(body, headers={"X-Sprintrt-Seconds": f"{time.perf_counter() - t0:.4f}"})

        @serve.batch(max_batch_size=options.max_batch, batch_wait_timeout_s=options.max_wait_ms / 1000,
                     batch_size_fn=lambda reqs: sum(r.n for r in reqs))
        async def _batched(self, requests: list):
            # The engines run in a worker thread: the event loop keeps answering /health and admitting.
            return await asyncio.get_running_loop().run_in_executor(None, self.server.run_batch, requests)

    return SprintServer


def build_app(args: dict):
    """Ray Serve application builder (the import_path of a `serve deploy` config): args are ServeOptions."""
    options = ServeOptions(**args)
    options.check()
    return create_deployment(options).bind(asdict(options))


def write_config(options: ServeOptions, path: str | Path, host: str = D.SERVE_HOST, port: int = D.SERVE_PORT) -> Path:
    """A Ray Serve config file for `serve deploy` on a cluster (one application, this deployment)."""
    import yaml

    options.check()
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": "sprintrt", "route_prefix": "/", "import_path": "sprintrt.serving.app:build_app",
            "args": asdict(options),
            "deployments": [{"name": "SprintServer", "num_replicas": options.replicas,
                             "ray_actor_options": {"num_gpus": options.num_gpus, "num_cpus": 0}}],
        }],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Generated by `sprintrt serve --write-config`; deploy with `serve deploy " + path.name + "`.\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def deploy(options: ServeOptions, name: str = "sprintrt", route_prefix: str = "/") -> None:
    """Deploy (or update) the application on the running Serve instance; returns when it is ready."""
    from ray import serve

    options.check()
    serve.run(create_deployment(options).bind(asdict(options)), name=name, route_prefix=route_prefix)


def run(options: ServeOptions, host: str = D.SERVE_HOST, port: int = D.SERVE_PORT, address: str | None = None,
        blocking: bool = True, say=print):
    """Start (or join, with `address`) Ray, start Serve on host:port, deploy, and block until Ctrl-C."""
    import ray
    from ray import serve

    options.check()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    deploy(options)
    say(f"serving {options.engine_dir} at http://{host}:{port}{api.ROUTE} ({options.replicas} replica(s); "
        f"GET /health, /ready, /metrics)")
    if not blocking:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("shutting down: finishing in-flight requests")
        serve.shutdown()

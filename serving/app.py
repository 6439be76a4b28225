"""`sprintrt serve`: the image API, in one process on one machine or as a Ray Serve application.

One FastAPI app (make_http_app) over one `Server` per replica, which loads SprintPipeline.from_engines
once. Requests are checked on arrival (JSON, fields, cost limits, then the runtime's own checks: a bad
one gets its 4xx before it joins a batch), then wait in a batcher (up to --max-batch images or
--max-wait-ms); requests of a batch that share a size and schedule run as one engine call. If a batched
call still fails, each request is run alone, so only the guilty one fails. A bounded queue per replica
answers 503 with Retry-After when full; a request past --timeout-s gets a 503 and its work stops at the
next stage boundary (SprintPipeline.deadline), counted in the queue until it has.

Two ways to run it (run()):
- One machine, one replica (the default): uvicorn in this process, listening on --host:--port only (no
  Ray: Ray 2.60's core processes listen on every interface whatever their node address). SIGINT and
  SIGTERM drain: new requests get 503, /ready turns 503, in-flight ones finish (up to
  --drain-timeout-s), then the process exits 0.
- Ray Serve (--address to join a cluster, or --replicas > 1): the same app as a deployment; Ray Serve
  batches (`@serve.batch`), restarts a replica that dies and drains replicas on shutdown.
"""


import asyncio
import logging
import signal
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from sprintrt import defaults as D
from sprintrt import specs as S
from sprintrt.serving import api

log = logging.getLogger("sprintrt.serve")

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
    max_pixels_per_request: int = D.SERVE_MAX_PIXELS_PER_REQUEST  # n x width x height; more get 413
    max_steps: int = D.SERVE_MAX_STEPS  # num_inference_steps per request; more get 422
    max_prompt_bytes: int = D.SERVE_MAX_PROMPT_BYTES  # UTF-8 bytes of the prompt; more get 413
    drain_timeout_s: float = D.SERVE_DRAIN_TIMEOUT_S  # on SIGINT/SIGTERM, how long in-flight requests may finish
    verify_sha256: bool = True  # hash every engine file against the manifest when a replica loads

    def check(self) -> None:
        from sprintrt.errors import invalid

        for name, low in (("max_batch", 1), ("max_queued", 1), ("replicas", 1), ("max_pixels_per_request", 1),
                          ("max_steps", 1), ("max_prompt_bytes", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise invalid(name, v, f"an integer >= {low}", f"pass --{name.replace('_', '-')} {max(low, 1)}")
        for name in ("max_wait_ms", "timeout_s", "num_gpus", "drain_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or (name == "timeout_s" and v == 0):
                raise invalid(name, v, "a non-negative number" + (" > 0" if name == "timeout_s" else ""),
                              f"pass e.g. --{name.replace('_', '-')} 10")
        if not (Path(self.engine_dir) / "manifest.json").is_file():
            from sprintrt.errors import EngineDirError

            raise EngineDirError(f"{self.engine_dir!r} has no manifest.json. Fix: build engines with `sprintrt build "
                                 f"ONNX_DIR -o {self.engine_dir}`")

    def limits(self):
        return api.Limits(max_pixels=self.max_pixels_per_request, max_steps=self.max_steps,
                          max_prompt_bytes=self.max_prompt_bytes)


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


@dataclass(frozen=True)
class Job:
    """An admitted, checked request and the monotonic time past which nobody waits for its answer."""
    request: api.GenerationRequest
    deadline: float


def load_pipelines(engine_dir, threads: int | None = None, verify_sha256: bool = True):
    """(SprintPipeline, SprintControlNetPipeline or None). Over engines with a ControlNet, both pipelines share
    the text encoder and VAE engines, loaded once; api.pipeline_for picks one per request."""
    from sprintrt.manifest import read_manifest
    from sprintrt.runtime.controlnet import SprintControlNetPipeline
    from sprintrt.runtime.pipeline import SprintPipeline

    built = read_manifest(engine_dir).components
    kw = dict(threads=threads, verify_sha256=verify_sha256)
    if not all(c in built for c in S.CONTROLNET_TO_IMAGE):
        return SprintPipeline.from_engines(engine_dir, **kw), None
    wanted = (*S.TEXT_TO_IMAGE, *S.CONTROLNET_TO_IMAGE)
    controlled = SprintControlNetPipeline.from_engines(engine_dir, components=[c for c in S.COMPONENTS
                                                                               if c in wanted and c in built], **kw)
    plain = SprintPipeline({c: controlled.engine(c) for c in S.TEXT_TO_IMAGE}, controlled.tokenizer,
                           controlled.manifest)
    return plain, controlled


class Server:
    """What one replica does, whatever runs it: admit, check, batch-run, answer."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.limits = options.limits()
        # Text to image; and, over engines with a ControlNet, SanaSprint + ControlNet sharing its engines.
        self.pipe, self.controlnet_pipe = load_pipelines(options.engine_dir, options.threads, options.verify_sha256)
        for pipe in self.pipelines():
            pipe.cache_instruction()  # the default instruction's text-encoder prefix, before the first request
        engine_batch = min(p.limits[c]["batch"].max for p in self.pipelines() for c in S.TRANSFORMER_FAMILY
                           if c in p.limits)
        self.max_images = min(options.max_batch, engine_batch)
        self.metrics = Metrics()
        self.admitted = 0  # requests answered or not whose work has not finished (queued, running or stopping)
        self.draining = False  # set on shutdown: new requests get 503, in-flight ones finish
        self.engine_calls: list[int] = []  # images per engine call, for tests and logs
        self._lock = threading.Lock()  # one engine call at a time per replica
        self.batched = None  # async (Job) -> dict | ApiError: the batcher of whoever runs this server

    def pipelines(self) -> list:
        return [p for p in (self.pipe, self.controlnet_pipe) if p is not None]

    # ---- admission ----------------------------------------------------------------------------
    def admit(self) -> None:
        if self.draining:
            raise api.ApiError(503, "the server is shutting down. Fix: retry after the Retry-After delay (another "
                                    "replica or the restarted server answers)", retry_after_s=5)
        if self.admitted >= self.options.max_queued:
            raise api.ApiError(503, f"the server is at capacity ({self.admitted} requests queued or running, "
                                    f"max_queued={self.options.max_queued}). Fix: retry after the Retry-After delay, "
                                    "or add replicas", retry_after_s=max(1.0, self.options.max_wait_ms / 1000))
        self.admitted += 1
        self.metrics.queue.set(self.admitted)

    def release(self, _=None) -> None:
        self.admitted -= 1
        self.metrics.queue.set(self.admitted)

    async def generate(self, request) -> tuple[int, dict, dict]:
        """One POST: (status, JSON body, headers). Every path answers in the API's error shape."""
        t0 = time.monotonic()
        try:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise api.ApiError(415, f"Content-Type {kind or 'missing'!r} is not allowed: expected "
                                        "'application/json'. Fix: send the body as JSON with that header")
            req = api.parse_request(await request.body(), self.limits)
            api.check_with_pipeline(api.pipeline_for(req.call_arguments(), self.pipe, self.controlnet_pipe), req)
            self.admit()
        except api.ApiError as e:
            return self._answer(e.status, e.body(), e.headers())
        # The work is a task of its own: if the caller stops waiting, it still ends (at its deadline, at the
        # next stage boundary) and only then leaves the queue count.
        task = asyncio.ensure_future(self.batched(Job(req, t0 + self.options.timeout_s)))
        task.add_done_callback(self.release)
        done, _ = await asyncio.wait({task}, timeout=max(t0 + self.options.timeout_s - time.monotonic(), 0.001))
        if not done:
            e = api.ApiError(503, f"the request did not finish within timeout_s={self.options.timeout_s} s; its work "
                                  "stops at the next stage. Fix: retry later, or ask for fewer or smaller images",
                             retry_after_s=5)
            return self._answer(503, e.body(), e.headers())
        result = task.result()
        if isinstance(result, api.ApiError):
            return self._answer(result.status, result.body(), result.headers())
        return self._answer(200, result, {"X-Sprintrt-Seconds": f"{time.monotonic() - t0:.4f}"})

    def _answer(self, status: int, body: dict, headers: dict) -> tuple[int, dict, dict]:
        self.metrics.requests.labels(str(status)).inc()
        return status, body, headers

    # ---- engine calls (a worker thread) --------------------------------------------------------
    def run_batch(self, jobs: list[Job]) -> list:
        """Run jobs: one engine call per group of equal batch keys (chunked to the images an engine call may
        hold). Returns, per job in order, its response body or the ApiError it answers. Never raises."""
        results: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            if time.monotonic() > job.deadline:  # answered 503 already: no engine time for it
                results[i] = api.ApiError(503, "the request passed its deadline before it ran", retry_after_s=5)
            else:
                groups[job.request.batch_key()].append(i)
        for indices in groups.values():
            chunk: list[int] = []
            for i in indices + [None]:
                if i is not None and sum(jobs[j].request.n for j in chunk) + jobs[i].request.n <= self.max_images:
                    chunk.append(i)
                    continue
                if chunk:
                    self._run_isolated(jobs, chunk, results)
                chunk = [i] if i is not None else []
        return results

    def _run_isolated(self, jobs: list[Job], chunk: list[int], results: list) -> None:
        """One engine call for the chunk; if it fails, each job again alone, so only the guilty one fails."""
        try:
            self._run_chunk(jobs, chunk, results)
        except Exception as e:  # noqa: BLE001 - every failure becomes an answer, never a dropped request
            if len(chunk) > 1:
                log.warning("a batch of %d requests failed (%s: %s); running each alone", len(chunk),
                            type(e).__name__, e)
                for i in chunk:
                    self._run_isolated(jobs, [i], results)
            else:
                results[chunk[0]] = self._error_answer(e)

    def _error_answer(self, e: Exception) -> api.ApiError:
        from sprintrt.errors import DeadlineExceeded, InvalidInputError

        if isinstance(e, DeadlineExceeded):
            return api.ApiError(503, str(e), retry_after_s=5)
        if isinstance(e, InvalidInputError):
            return api.as_api_error(e)
        log.error("a request failed in the engines:\n%s", "".join(traceback.format_exception(e)))
        return api.ApiError(500, f"the engines failed on this request ({type(e).__name__}: {e}). Fix: retry; if it "
                                 "fails again, report it with the request body")

    def _run_chunk(self, jobs: list[Job], chunk: list[int], results: list) -> None:
        reqs = [jobs[i].request for i in chunk]
        images = sum(r.n for r in reqs)
        call = api.batch_call(reqs)
        pipe = api.pipeline_for(call, self.pipe, self.controlnet_pipe)
        with self._lock, pipe.deadline(max(jobs[i].deadline for i in chunk)):
            out = pipe(**call, output_type="pil")
        self.engine_calls.append(images)
        self.metrics.batch_images.observe(images)
        for stage in STAGES:
            if stage in out.timings:
                v = out.timings[stage]
                self.metrics.stage.labels(stage).observe(sum(v) if isinstance(v, list) else v)
        created, k = int(time.time()), 0
        timings = {s: (round(sum(v), 4) if isinstance(v, list) else round(v, 4)) for s, v in out.timings.items()}
        for i, req in zip(chunk, reqs):
            results[i] = api.response_body(req, out.images[k:k + req.n], created, timings, images)
            k += req.n


class LocalBatcher:
    """The batcher of the one-process server (Ray Serve's `@serve.batch` needs a running Serve replica):
    waits up to max_wait_s for up to max_images images, then runs them in a worker thread, one batch at a
    time."""

    def __init__(self, server: Server):
        self.server = server
        self.max_wait_s = server.options.max_wait_ms / 1000
        self.waiting: list[tuple[Job, asyncio.Future]] = []
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task | None = None

    async def __call__(self, job: Job):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((job, future))
        self.arrived.set()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.ensure_future(self._work())
        return await asyncio.shield(future)  # a caller that stops waiting does not take the job out of the batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting:
            start = loop.time()
            while self._images() < self.server.max_images and loop.time() - start < self.max_wait_s:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), self.max_wait_s - (loop.time() - start))
                except asyncio.TimeoutError:
                    break
            batch, images = [], 0
            while self.waiting and (not batch or images + self.waiting[0][0].request.n <= self.server.max_images):
                batch.append(self.waiting.pop(0))
                images += batch[-1][0].request.n
            results = await loop.run_in_executor(None, self.server.run_batch, [job for job, _ in batch])
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def _images(self) -> int:
        return sum(job.request.n for job, _ in self.waiting)


def make_http_app(server_of):
    """The FastAPI app: routes over `server_of()` (this process's Server), every answer in the API's JSON
    shape (404, 405 and 500 included)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    app = FastAPI(title="sprintrt", description="SANA-Sprint images over sprintrt engines", docs_url=None,
                  redoc_url=None)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(api.ApiError(status, message).body(), status_code=status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        allowed = (e.headers or {}).get("Allow", "another method")
        fix = {404: f"the API is POST {api.ROUTE}, GET /health, /ready, /metrics",
               405: f"{request.url.path} takes {allowed}"}
        return error(e.status_code, f"{request.method} {request.url.path}: {e.detail}. Fix: "
                                    f"{fix.get(e.status_code, 'see the README')}", e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.error("unexpected error:\n%s", "".join(traceback.format_exception(e)))
        return error(500, f"internal error ({type(e).__name__}). Fix: retry; if it fails again, report it")

    @app.get("/health")
    def health():
        return {"status": "live"}

    @app.get("/ready")
    def ready():
        server = server_of()
        if server.draining:
            return error(503, "the server is shutting down. Fix: send requests elsewhere", {"Retry-After": "5"})
        return {"status": "ready", "engine_dir": server.options.engine_dir, "max_images_per_call": server.max_images}

    @app.get("/metrics")
    def metrics():
        return Response(server_of().metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/stats")
    def stats():
        server = server_of()
        return {"engine_calls": list(server.engine_calls), "admitted": server.admitted}

    @app.post(api.ROUTE)
    async def generate(request: Request):
        status, body, headers = await server_of().generate(request)
        return JSONResponse(body, status_code=status, headers=headers)

    return app


# The Server of this process: a Ray Serve replica is a process of its own, as is the one-process server.
_SERVER: Server | None = None


def _this_server() -> Server:
    return _SERVER


def _set_server(server: Server) -> Server:
    # A module-level function: Ray pickles the deployment class by value, with a copy of the globals it names,
    # so the class must not assign the global itself.
    global _SERVER
    _SERVER = server
    return server


def create_deployment(options: ServeOptions):
    """The Ray Serve deployment (class) for these options; `.bind()` it to get the application."""
    from ray import serve

    @serve.deployment(name="SprintServer", num_replicas=options.replicas,
                      ray_actor_options={"num_gpus": options.num_gpus, "num_cpus": 0},
                      max_ongoing_requests=options.max_queued + options.max_batch,
                      graceful_shutdown_timeout_s=options.drain_timeout_s,
                      health_check_period_s=5.0)
    @serve.ingress(make_http_app(_this_server))
    class SprintServer:
        def __init__(self, opts: dict):
            self.server = _set_server(Server(ServeOptions(**opts)))
            self.server.batched = self._batched

        @serve.batch(max_batch_size=options.max_batch, batch_wait_timeout_s=options.max_wait_ms / 1000,
                     batch_size_fn=lambda jobs: sum(j.request.n for j in jobs))
        async def _batched(self, jobs: list):
            # The engines run in a worker thread: the event loop keeps answering /health and admitting.
            return await asyncio.get_running_loop().run_in_executor(None, self.server.run_batch, jobs)

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
    """Serve until SIGINT or SIGTERM, then drain and return. One replica and no `address`: in this process
    (uvicorn; only host:port listens). Otherwise Ray Serve: join `address` or start a local Ray."""
    options.check()
    if address is None and options.replicas == 1:
        return run_local(options, host, port, say)
    return run_ray(options, host, port, address, blocking, say)


class _DrainingUvicorn:
    """uvicorn.Server whose SIGINT/SIGTERM drains first: new requests get 503 and /ready 503 while
    in-flight ones finish (up to drain_timeout_s); then it stops and the process exits 0. A second signal
    stops at once."""

    @staticmethod
    def make(config, server: Server, say):
        import uvicorn

        class Draining(uvicorn.Server):
            def handle_exit(self, sig, frame):  # noqa: ARG002 - signal handler signature
                if server.draining:
                    self.should_exit = self.force_exit = True
                    return
                server.draining = True
                say(f"{signal.Signals(sig).name}: draining ({server.admitted} request(s) in flight, at most "
                    f"{server.options.drain_timeout_s:g} s); a second signal stops at once")
                self._sprintrt_loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.drain()))

            async def drain(self):
                end = time.monotonic() + server.options.drain_timeout_s
                while server.admitted > 0 and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                if server.admitted:
                    say(f"drain timeout: {server.admitted} request(s) still running are dropped")
                self.should_exit = True

            async def startup(self, sockets=None):
                self._sprintrt_loop = asyncio.get_running_loop()
                await super().startup(sockets)

        return Draining(config)


def run_local(options: ServeOptions, host: str, port: int, say=print) -> None:
    """The one-process server: load the engines, listen on host:port, drain on SIGINT/SIGTERM, return."""
    import errno
    import socket

    import uvicorn

    from sprintrt.errors import invalid

    try:  # before the engines load: a busy port or a wrong host is said at once
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise invalid("port" if e.errno == errno.EADDRINUSE else "host", port if e.errno == errno.EADDRINUSE else host,
                      "a free port on an address of this machine", f"pick another --port or --host ({e.strerror})") from None
    server = _set_server(Server(options))
    server.batched = LocalBatcher(server)
    app = make_http_app(_this_server)
    say(f"serving {options.engine_dir} at http://{host}:{port}{api.ROUTE} (one process; GET /health, /ready, "
        "/metrics; Ctrl-C or SIGTERM drains)")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    _DrainingUvicorn.make(config, server, say).run()
    say("stopped")


def run_ray(options: ServeOptions, host: str, port: int, address: str | None, blocking: bool = True, say=print):
    """Start (or join, with `address`) Ray, start Serve on host:port, deploy, and block until a signal."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # Ray 2.60's own processes listen on every interface (authenticated by Ray's token), whatever
            # their node address: say so; the one-process server opens only host:port.
            say("note: a local Ray starts (--replicas > 1); its processes listen on every interface, token-"
                "authenticated. One replica without --address serves without Ray, on host:port only")
            ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    deploy(options)
    say(f"serving {options.engine_dir} at http://{host}:{port}{api.ROUTE} ({options.replicas} replica(s); "
        f"GET /health, /ready, /metrics)")
    if not blocking:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    say(f"shutting down: Ray Serve finishes in-flight requests (up to {options.drain_timeout_s:g} s)")
    serve.shutdown()

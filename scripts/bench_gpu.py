"""GPU benchmark of pagedserve on one CUDA device: kernel correctness, memory bandwidth, decode speed, throughput.

In one run:
1. context: device, software versions, commit, date;
2. kernel correctness: every Triton kernel (KV-cache write, decode attention with one split and with several,
   prefill over a cached prefix, RMSNorm + residual, rotary) against the PyTorch path on random inputs, in float32
   and bfloat16; relative error and PASS/FAIL each (any FAIL makes the exit status 1, after everything else ran);
3. copy bandwidth: a device-to-device copy of 1 GiB, (bytes read + bytes written) / time;
4. decode attention bandwidth on the Llama-3-8B attention shape (32 query heads, 8 KV heads, head_dim 128,
   bfloat16, blocks of 16 tokens) at 64 x 4096 and 1 x 32768 context tokens: KV bytes read / kernel time, and its
   fraction of the copy bandwidth (target >= 70%);
5. end to end on a Llama-3-8B-shaped model with random weights (load_format "dummy", bfloat16):
   a. single-request decode tok/s for a 128-token prompt, with CUDA graphs and eager: N / (t(1 + N tokens) - t(1
      token)), medians of 3, against the roofline copy bandwidth / weight bytes (target >= 75%);
   b. workload W (`--num-requests` x `--input-len` x `--output-len`, greedy, ignore EOS): pagedserve against
      transformers static batching (`model.generate` on left-padded prompts) and transformers' continuous
      batching (`model.generate_batch`, when the installed transformers has it), same prompts, ratios in a table.
GPU times are medians of CUDA-event-timed runs after warm-up; generate calls are timed on the host.

Example: .venv/bin/python scripts/bench_gpu.py --json benchmarks/gpu.json
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench_common import git_commit, local_time, print_context
from bench_offline import (
    OURS, Result, Workload, add_ratios, continuous_batching, has_generate_batch, llm_generate, print_table,
    random_prompts, static_batching, time_workload,
)
from engine import LLM, SamplingParams
from engine.attention import torch_backend
from engine.attention.triton_backend import programs_wanted
from engine.kernels import rms_norm as triton_rms_norm
from engine.kernels import rotary as triton_rotary
from engine.kernels.decode_attention import decode_attention, decode_num_splits
from engine.kernels.kv_cache_write import write_kv_cache
from engine.kernels.prefill_attention import prefill_attention
from engine.layers.norm import rms_norm
from engine.layers.rotary import RotaryEmbedding, apply_rotary

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from paged_kv import TOLERANCE, random_paged_kv, reference_attention, relative_error  # noqa: E402

DEVICE = torch.device("cuda", 0)
LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CHECK_DTYPES = (torch.float32, torch.bfloat16)
DECODE_CHECK_LENS = [1, 37, 300, 1000, 4097]  # mid-block and block-aligned ends, short and split-worthy contexts
PREFILL_CHECK_CHUNKS = [(0, 45), (32, 20), (21, 7), (64, 70), (90, 1), (0, 16), (1000, 300)]  # (prefix, query)
CHECK_TOKENS = 64
DECODE_SHAPES = ((64, 4096), (1, 32768))  # (batch, context tokens)
COPY_BYTES = 1 << 30
WARMUP_RUNS = 3
TIMED_RUNS = 20
COPY_TARGET = 0.70
ROOFLINE_TARGET = 0.75
DECODE_PROMPT_LEN = 128
DECODE_REPEATS = 3
DECODE_SEED = 100  # single-request prompts: seeds 100.. (W uses 0, its warm-up 3), so none hits the prefix cache
WARMUP_REQUESTS = 32
WARMUP_TOKENS = 16
ENGINE_ARGS: dict[str, Any] = {"load_format": "dummy", "dtype": "bfloat16", "device": "cuda"}


@dataclass
class KernelCheck:
    kernel: str
    dtype: str
    error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance  # False for NaN too


@dataclass
class DecodeBandwidth:
    batch: int
    context: int
    num_splits: int
    kernel_us: float
    kv_bytes: int
    gb_s: float
    fraction_of_copy: float


@dataclass
class SingleDecode:
    mode: str
    prompt_len: int
    decode_tokens: int
    short_s: float
    long_s: float
    decode_tok_s: float
    weight_bytes: int
    roofline_tok_s: float
    fraction_of_roofline: float


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-e2e", action="store_true", help="stop after the kernel and bandwidth measurements")
    parser.add_argument("--skip-peers", action="store_true", help="time pagedserve only in workload W")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON to this path")
    parser.add_argument("--num-requests", type=positive_int, default=256, help="requests in workload W")
    parser.add_argument("--input-len", type=positive_int, default=512, help="prompt tokens per request in W")
    parser.add_argument("--output-len", type=positive_int, default=256, help="output tokens per request in W")
    parser.add_argument(
        "--decode-tokens", type=positive_int, default=256, help="N, the decode steps timed for a single request"
    )
    parser.add_argument(
        "--peer-requests", type=positive_int,
        help="time the transformers peers on the first N requests of W only (tok/s at that batch; default: all)",
    )
    parser.add_argument(
        "--peer-batch-size", type=positive_int,
        help="requests per transformers static-batching generate call (default: all in one call)",
    )
    return parser.parse_args()


def gpu_context() -> dict[str, Any]:
    import transformers
    import triton

    properties = torch.cuda.get_device_properties(DEVICE)
    return {
        "device": properties.name,
        "multiprocessors": properties.multi_processor_count,
        "memory_gib": round(properties.total_memory / 1024**3, 1),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": local_time(),
        "git_commit": git_commit(),
    }


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded on the host, so that a run's inputs do not depend on the device's generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DEVICE, dtype)


def check_kv_write(dtype: torch.dtype) -> float:
    """Slots scattered over the cache, every seventh token padding (slot -1), k and v strided out of one qkv."""
    num_blocks, num_tokens = 64, 300
    generator = torch.Generator().manual_seed(1)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=generator)[:num_tokens].to(DEVICE)
    padding = torch.arange(num_tokens, device=DEVICE) % 7 == 3
    slot_mapping = torch.where(padding, -1, slots)
    qkv = random_tensor((num_tokens, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM), dtype, seed=2)
    k, v = qkv[:, NUM_HEADS : NUM_HEADS + NUM_KV_HEADS], qkv[:, NUM_HEADS + NUM_KV_HEADS :]
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = random_tensor(shape, dtype, seed=3), random_tensor(shape, dtype, seed=4)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    torch_backend.write_kv_cache(k[~padding], v[~padding], expected_k, expected_v, slot_mapping[~padding])
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return max(relative_error(k_cache, expected_k), relative_error(v_cache, expected_v))


def check_decode(dtype: torch.dtype, num_splits: int) -> float:
    """The worst sequence's error: one sequence's large error must not hide behind the others' outputs."""
    kv = random_paged_kv(DECODE_CHECK_LENS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, dtype)
    q = random_tensor((len(DECODE_CHECK_LENS), NUM_HEADS, HEAD_DIM), dtype, seed=5)
    scale = HEAD_DIM**-0.5
    out = decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, num_splits)
    return max(
        relative_error(out[i], reference_attention(q[i : i + 1], kv, i, scale)[0])
        for i in range(len(DECODE_CHECK_LENS))
    )


def check_prefill(dtype: torch.dtype) -> float:
    context_lens = [prefix + query for prefix, query in PREFILL_CHECK_CHUNKS]
    query_lens = [query for _, query in PREFILL_CHECK_CHUNKS]
    starts = [0, *itertools.accumulate(query_lens)]
    kv = random_paged_kv(context_lens, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, dtype)
    q = random_tensor((starts[-1], NUM_HEADS, HEAD_DIM), dtype, seed=6)
    scale = HEAD_DIM**-0.5
    out = prefill_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, torch.tensor(starts, device=DEVICE),
        0, len(query_lens), max(query_lens), scale,
    )
    return max(
        relative_error(out[start:end], reference_attention(q[start:end], kv, i, scale))
        for i, (start, end) in enumerate(zip(starts, starts[1:]))
    )


def check_rms_norm(dtype: torch.dtype) -> float:
    """Both results: the normalized rows and the residual sum; rows of x strided."""
    hidden = LLAMA3_8B["hidden_size"]
    x = random_tensor((2 * CHECK_TOKENS, hidden), dtype, seed=7)[::2]
    residual = random_tensor((CHECK_TOKENS, hidden), dtype, seed=8)
    weight = (1 + 0.5 * random_tensor((hidden,), torch.float32, seed=9).tanh()).to(dtype)
    eps = LLAMA3_8B["rms_norm_eps"]
    out, next_residual = triton_rms_norm.rms_norm(x, residual, weight, eps)
    ref, ref_residual = rms_norm(x, residual, weight, eps)
    return max(relative_error(out, ref), relative_error(next_residual, ref_residual))


def check_rotary(dtype: torch.dtype) -> float:
    """Query and key heads sliced out of a fused qkv (strided rows), at random positions."""
    max_position = LLAMA3_8B["max_position_embeddings"]
    rotary = RotaryEmbedding(HEAD_DIM, max_position, LLAMA3_8B["rope_theta"], {}).to(DEVICE)
    positions = torch.randint(0, max_position, (CHECK_TOKENS,), generator=torch.Generator().manual_seed(10))
    qkv = random_tensor((CHECK_TOKENS, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM), dtype, seed=11)
    query_key = qkv[:, : NUM_HEADS + NUM_KV_HEADS]
    angles = rotary(positions.to(DEVICE), dtype)
    return relative_error(triton_rotary.apply_rotary(query_key, angles), apply_rotary(query_key, angles))


def run_kernel_checks() -> list[KernelCheck]:
    several = max(2, decode_num_splits(len(DECODE_CHECK_LENS), NUM_KV_HEADS, max(DECODE_CHECK_LENS),
                                       programs_wanted(DEVICE)))
    checks: dict[str, Callable[[torch.dtype], float]] = {
        "kv_cache_write": check_kv_write,
        "decode (1 split)": lambda dtype: check_decode(dtype, 1),
        f"decode ({several} splits)": lambda dtype: check_decode(dtype, several),
        "prefill (cached prefix)": check_prefill,
        "rms_norm + residual": check_rms_norm,
        "rotary": check_rotary,
    }
    results = []
    for (name, check), dtype in itertools.product(checks.items(), CHECK_DTYPES):
        tolerance = 0.0 if name == "kv_cache_write" else TOLERANCE[dtype]  # a copy must be exact
        results.append(KernelCheck(name, dtype_name(dtype), check(dtype), tolerance))
    return results


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def print_checks(checks: list[KernelCheck]) -> None:
    print(f"{'kernel':<24} {'dtype':<9} {'rel error':>10} {'tolerance':>10}  result")
    for c in checks:
        print(f"{c.kernel:<24} {c.dtype:<9} {c.error:>10.2e} {c.tolerance:>10.1e}  {'PASS' if c.passed else 'FAIL'}")


def cuda_time_s(fn: Callable[[], object]) -> float:
    """Median seconds of TIMED_RUNS calls, each between two CUDA events, after WARMUP_RUNS untimed calls."""
    for _ in range(WARMUP_RUNS):
        fn()
    times = []
    for _ in range(TIMED_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int = COPY_BYTES) -> float:
    """Bytes per second a device-to-device copy moves, counting each byte read and each byte written."""
    source = torch.ones(num_bytes, dtype=torch.uint8, device=DEVICE)
    target = torch.empty_like(source)
    return 2 * num_bytes / cuda_time_s(lambda: target.copy_(source))


def kv_bytes(batch: int, context: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
    """What decode attention must read: the key and the value of every context token of every sequence."""
    return 2 * batch * context * num_kv_heads * head_dim * element_size


def decode_bandwidth(batch: int, context: int, copy_bytes_per_s: float) -> DecodeBandwidth:
    """Decode attention over caches of random values, each sequence's blocks shuffled over the cache."""
    width = -(-context // BLOCK_SIZE)
    num_blocks = batch * width
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device=DEVICE).view(batch, width)
    context_lens = torch.full((batch,), context, dtype=torch.long, device=DEVICE)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty_like(q)
    num_splits = decode_num_splits(batch, NUM_KV_HEADS, context, programs_wanted(DEVICE))
    seconds = cuda_time_s(
        lambda: decode_attention(q, k_cache, v_cache, block_tables, context_lens, HEAD_DIM**-0.5, num_splits, out=out)
    )
    read = kv_bytes(batch, context, NUM_KV_HEADS, HEAD_DIM, k_cache.element_size())
    return DecodeBandwidth(
        batch, context, num_splits, seconds * 1e6, read, read / seconds / 1e9, read / seconds / copy_bytes_per_s
    )


def print_decode_bandwidth(results: list[DecodeBandwidth]) -> None:
    print(f"{'batch':>5} {'context':>8} {'splits':>6} {'kernel us':>10} {'KV GB':>7} {'GB/s':>8} {'of copy':>8}")
    for r in results:
        print(
            f"{r.batch:>5} {r.context:>8} {r.num_splits:>6} {r.kernel_us:>10.1f} {r.kv_bytes / 1e9:>7.3f} "
            f"{r.gb_s:>8.0f} {r.fraction_of_copy:>7.1%} {target_note(r.fraction_of_copy, COPY_TARGET)}"
        )


def target_note(fraction: float, target: float) -> str:
    return f"(target >= {target:.0%}: {'met' if fraction >= target else 'NOT met'})"


def write_hf_config(folder: Path, config: dict[str, Any]) -> Path:
    """A Hugging Face model folder holding only config.json: enough for load_format "dummy" and token-id prompts."""
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(param.numel() * param.element_size() for param in model.parameters())


def release_memory() -> None:
    """Return the CUDA memory of the system just benchmarked (its objects already unreachable) to the device."""
    gc.collect()
    torch.cuda.empty_cache()


def generate_seconds(llm: LLM, prompt: list[int], max_tokens: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    seconds = time.perf_counter() - start
    assert len(output.outputs[0].token_ids) == max_tokens, "generate stopped early"
    return seconds


def single_decode(llm: LLM, mode: str, decode_tokens: int, copy_bytes_per_s: float) -> SingleDecode:
    """Every run has a prompt of its own, so that the prefix cache never spares a prefill."""
    vocab_size = llm.engine.model_config.vocab_size
    seeds = itertools.count(DECODE_SEED)

    def run(max_tokens: int) -> float:
        return generate_seconds(llm, random_prompts(1, DECODE_PROMPT_LEN, vocab_size, next(seeds))[0], max_tokens)

    run(1 + decode_tokens)  # compiles every kernel variant the timed runs use
    short = statistics.median([run(1) for _ in range(DECODE_REPEATS)])
    long = statistics.median([run(1 + decode_tokens) for _ in range(DECODE_REPEATS)])
    tok_s = decode_tokens / (long - short)
    weights = weight_bytes(llm.engine.runner.model)
    roofline = copy_bytes_per_s / weights
    return SingleDecode(mode, DECODE_PROMPT_LEN, decode_tokens, short, long, tok_s, weights, roofline, tok_s / roofline)


def print_single_decodes(results: list[SingleDecode]) -> None:
    print(f"{'mode':<12} {'t(1) s':>8} {'t(1+N) s':>9} {'N':>5} {'tok/s':>8} {'roofline':>9} {'of roofline':>11}")
    for r in results:
        print(
            f"{r.mode:<12} {r.short_s:>8.3f} {r.long_s:>9.3f} {r.decode_tokens:>5} {r.decode_tok_s:>8.1f} "
            f"{r.roofline_tok_s:>9.1f} {r.fraction_of_roofline:>10.1%} "
            f"{target_note(r.fraction_of_roofline, ROOFLINE_TARGET)}"
        )
    gigabytes = results[0].weight_bytes / 1e9
    print(f"roofline = copy bandwidth / weight bytes ({gigabytes:.2f} GB: every parameter, embedding and lm_head)")


def bench_ours_graphs(
    folder: Path, args: argparse.Namespace, warmup: Workload, workload: Workload, copy_bytes_per_s: float
) -> tuple[SingleDecode, Result]:
    """The default engine (CUDA graphs): single-request decode, then workload W."""
    print(f"[{OURS}] loading with CUDA graphs", flush=True)
    llm = LLM(model=str(folder), **ENGINE_ARGS)
    print(f"[{OURS}] {llm.engine.runner.num_kv_blocks} KV blocks; timing single-request decode", flush=True)
    decode = single_decode(llm, "cuda graphs", args.decode_tokens, copy_bytes_per_s)
    generate = llm_generate(llm)
    generate(warmup.prompts, warmup.output_len)
    print(f"[{OURS}] timing {workload.name}", flush=True)
    return decode, time_workload(OURS, generate, workload)


def bench_ours_eager(folder: Path, args: argparse.Namespace, copy_bytes_per_s: float) -> SingleDecode:
    print(f"[{OURS}] loading with enforce_eager; timing single-request decode", flush=True)
    llm = LLM(model=str(folder), enforce_eager=True, **ENGINE_ARGS)
    return single_decode(llm, "eager", args.decode_tokens, copy_bytes_per_s)


def load_hf_model(folder: Path) -> Any:
    """transformers' Llama built from the same config, with its own random initialization, on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with DEVICE:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def bench_peer(system: str, folder: Path, args: argparse.Namespace, warmup: Workload, workload: Workload) -> Result:
    print(f"[{system}] loading", flush=True)
    model = load_hf_model(folder)
    if system == "transformers":
        generate = static_batching(model, args.peer_batch_size)
    else:
        generate = continuous_batching(model)
    generate(warmup.prompts, warmup.output_len)
    print(f"[{system}] timing {workload.name} ({workload.num_requests} requests)", flush=True)
    return time_workload(system, generate, workload)


def peer_notes(args: argparse.Namespace, workload: Workload, peer_workload: Workload) -> list[str]:
    batch = args.peer_batch_size or peer_workload.num_requests
    notes = [
        f"transformers static batching: {peer_workload.num_requests} requests in generate calls of up to {batch}",
        "transformers-paged: generate_batch allocates its paged cache and warms up inside every (timed) call",
    ]
    if peer_workload.num_requests < workload.num_requests:
        notes.append(
            f"the transformers peers ran the first {peer_workload.num_requests} of the {workload.num_requests} "
            "requests of W: compare their tok/s, not their wall time"
        )
    return notes


def bench_peers(
    folder: Path, args: argparse.Namespace, warmup: Workload, workload: Workload
) -> tuple[list[Result], list[str]]:
    peer_workload = Workload(workload.name, workload.prompts[: args.peer_requests], workload.output_len)
    notes = peer_notes(args, workload, peer_workload)
    results = [bench_peer("transformers", folder, args, warmup, peer_workload)]
    release_memory()
    if has_generate_batch():
        results.append(bench_peer("transformers-paged", folder, args, warmup, peer_workload))
        release_memory()
    else:
        notes.append("transformers-paged skipped: the installed transformers has no generate_batch")
    return results, notes


def bench_end_to_end(args: argparse.Namespace, copy_bytes_per_s: float) -> dict[str, Any]:
    vocab_size = LLAMA3_8B["vocab_size"]
    workload = Workload("W", random_prompts(args.num_requests, args.input_len, vocab_size, seed=0), args.output_len)
    warmup_requests = min(args.num_requests, WARMUP_REQUESTS)
    warmup = Workload("warmup", random_prompts(warmup_requests, args.input_len, vocab_size, seed=3), WARMUP_TOKENS)
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as temp:
        folder = write_hf_config(Path(temp), LLAMA3_8B)
        graphs_decode, ours = bench_ours_graphs(folder, args, warmup, workload, copy_bytes_per_s)
        release_memory()
        decodes = [graphs_decode, bench_ours_eager(folder, args, copy_bytes_per_s)]
        release_memory()
        results = [ours]
        if not args.skip_peers:
            peer_results, notes = bench_peers(folder, args, warmup, workload)
            results.extend(peer_results)
    add_ratios(results)
    section("single-request decode, Llama-3-8B shape, bfloat16")
    print_single_decodes(decodes)
    section(f"workload {workload.name}: {args.num_requests} x {args.input_len} in x {args.output_len} out, greedy")
    print_table(results)
    for note in notes:
        print(f"note: {note}")
    return {
        "single_decode": [asdict(decode) for decode in decodes],
        "workload": [asdict(result) for result in results],
        "notes": notes,
    }


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device, and torch.cuda.is_available() is False here")
    started = time.perf_counter()
    report: dict[str, Any] = {"context": gpu_context()}
    print_context(report["context"])

    section("kernel correctness against the PyTorch path")
    checks = run_kernel_checks()
    print_checks(checks)
    report["kernels"] = [{**asdict(check), "passed": check.passed} for check in checks]

    section("copy bandwidth (read + write of 1 GiB)")
    copy_bytes_per_s = copy_bandwidth()
    print(f"{copy_bytes_per_s / 1e9:.0f} GB/s")
    report["copy_gb_s"] = copy_bytes_per_s / 1e9

    section("decode attention bandwidth, Llama-3-8B attention shape, bfloat16")
    decodes = [decode_bandwidth(batch, context, copy_bytes_per_s) for batch, context in DECODE_SHAPES]
    print_decode_bandwidth(decodes)
    report["decode_attention"] = [asdict(decode) for decode in decodes]

    if not args.skip_e2e:
        report.update(bench_end_to_end(args, copy_bytes_per_s))
    report["elapsed_s"] = time.perf_counter() - started
    print(f"\nelapsed: {report['elapsed_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = sorted({f"{check.kernel} ({check.dtype})" for check in checks if not check.passed})
    if failed:
        raise SystemExit(f"kernel check(s) FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()

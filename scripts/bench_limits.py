"""This machine's limits for a model's step, so that every throughput figure can be read as a fraction of them.

Measures, with torch's threads (default: all cores):
* memory bandwidth: reading a 1 GiB float32 tensor (sum) and copying it;
* the model's matmuls at M rows (1, 64, 2048 by default): every linear weight of every layer, in the model's
  dtype, packed for oneDNN as the engine packs them, run one after the other as a forward does (so the weights
  come from memory, not cache), with the LM head timed apart; as ms per pass, GFLOP/s and weight GB/s; at one
  row also the engine's native single-row matmul over the plain weights, where the native kernels build.

From these it derives the matmul-only bound of the offline workloads of bench_offline.py (W: 64 x 128 x 128,
W1: 1 x 128 x 128): prefill in chunks of the prefill rows, then one decode step per output token, LM head rows
only where tokens are sampled, each with the faster kernel measured. Attention, elementwise work and sampling are
left out, so no engine reaches it.

Example: .venv/bin/python scripts/bench_limits.py --json limits.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bench_common import cpu_model, git_commit, local_time, print_context
from engine.dtypes import resolve_dtype
from engine.layers.linear import can_pack
from engine.loader import default_model_path, read_model_config, resolve_model
from engine.models.config import ModelConfig

BANDWIDTH_BYTES = 1 << 30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(default_model_path()), help="model whose shapes are measured")
    parser.add_argument("--dtype", default="auto", help="auto resolves as the engine does")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64, 2048], help="matmul rows to measure")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def seconds_per_call(fn: Callable[[], Any], repeats: int) -> float:
    """The median of `repeats` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def bandwidth_gbps(repeats: int) -> dict[str, float]:
    source = torch.ones(BANDWIDTH_BYTES // 4)
    target = torch.empty_like(source)
    read = seconds_per_call(source.sum, repeats)
    copy = seconds_per_call(lambda: target.copy_(source), repeats)
    return {"read_gbps": BANDWIDTH_BYTES / read / 1e9, "copy_gbps": 2 * BANDWIDTH_BYTES / copy / 1e9}


def layer_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's matmuls: stacked QKV, O, stacked gate/up, down."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, inner = config.hidden_size, config.intermediate_size
    return [(q + 2 * kv, hidden), (hidden, q), (2 * inner, hidden), (hidden, inner)]


def native_gemv() -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The engine's native single-row matmul, where the native kernels build here."""
    from engine.native.build import native_error

    if native_error() is not None:
        return None
    return lambda x, weight: torch.ops.pagedserve.gemv(x, weight, None)


def packed(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if not can_pack(weight):
        return lambda x: torch.nn.functional.linear(x, weight)
    reordered = torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, reordered, None, "none", [], "")


def matmul_rates(config: ModelConfig, dtype: torch.dtype, rows: list[int], repeats: int) -> dict[str, Any]:
    shapes = layer_shapes(config) * config.num_layers
    weights = [torch.randn(out, inp, dtype=dtype) for out, inp in shapes]
    head_weight = torch.randn(config.vocab_size, config.hidden_size, dtype=dtype)
    matmuls = [(packed(weight), weight.shape[1]) for weight in weights]
    head = packed(head_weight)
    gemv = native_gemv()
    element = torch.finfo(dtype).bits // 8
    layer_flops = 2 * sum(out * inp for out, inp in shapes)
    results = {}
    for m in rows:
        inputs = {inp: torch.randn(m, inp, dtype=dtype) for _, inp in shapes}
        layers_s = seconds_per_call(lambda: [matmul(inputs[inp]) for matmul, inp in matmuls], repeats)
        head_s = seconds_per_call(lambda: head(inputs[config.hidden_size]), repeats)
        results[str(m)] = {
            "layers_ms": layers_s * 1e3,
            "lm_head_ms": head_s * 1e3,
            "layers_gflops": m * layer_flops / layers_s / 1e9,
            "layers_weight_gbps": layer_flops // 2 * element / layers_s / 1e9,
        }
        if m == 1 and gemv is not None:
            x = inputs[config.hidden_size]
            single_s = seconds_per_call(lambda: [gemv(inputs[w.shape[1]], w) for w in weights], repeats)
            results["1"]["native_gemv"] = {
                "layers_ms": single_s * 1e3,
                "lm_head_ms": seconds_per_call(lambda: gemv(x, head_weight), repeats) * 1e3,
                "layers_weight_gbps": layer_flops // 2 * element / single_s / 1e9,
            }
    return results


def fastest(rate: dict[str, Any]) -> dict[str, Any]:
    """The oneDNN figures of one row count, or the native single-row matmul's where it is faster."""
    native = rate.get("native_gemv")
    return native if native and native["layers_ms"] < rate["layers_ms"] else rate


def workload_bound(rates: dict[str, Any], requests: int, input_len: int, output_len: int) -> float:
    """Output tok/s if a step cost only its matmuls: prefill in chunks of the largest measured rows, then decode
    steps of `requests` rows (the closest measured row count), the LM head on the sampled rows only."""
    measured = sorted(int(m) for m in rates)
    chunk = measured[-1]
    decode_rows = min(measured, key=lambda m: abs(m - requests))
    per_token = {m: rates[str(m)]["layers_ms"] / m for m in measured}
    prefill_ms = requests * input_len * per_token[chunk]
    decode = fastest(rates[str(decode_rows)])
    step_ms = (decode["layers_ms"] + decode["lm_head_ms"]) * requests / decode_rows
    return requests * output_len / ((prefill_ms + output_len * step_ms) / 1e3)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = read_model_config(resolve_model(args.model))
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    context = {"date": local_time(), "commit": git_commit(), "cpu": cpu_model(), "threads": args.threads,
               "model": Path(args.model).name, "dtype": str(dtype).removeprefix("torch.")}
    print_context(context)
    bandwidth = bandwidth_gbps(args.repeats)
    rates = matmul_rates(config, dtype, sorted(set(args.rows)), args.repeats)
    bounds = {"W": workload_bound(rates, 64, 128, 128), "W1": workload_bound(rates, 1, 128, 128)}
    print(f"read {bandwidth['read_gbps']:.1f} GB/s, copy {bandwidth['copy_gbps']:.1f} GB/s")
    for m, rate in rates.items():
        print(f"M={m:>5}: layers {rate['layers_ms']:8.2f} ms ({rate['layers_gflops']:7.1f} GFLOP/s, "
              f"{rate['layers_weight_gbps']:5.1f} GB/s of weights), LM head {rate['lm_head_ms']:.2f} ms")
        if "native_gemv" in rate:
            native = rate["native_gemv"]
            print(f"M=    1, native gemv: layers {native['layers_ms']:8.2f} ms ({native['layers_weight_gbps']:5.1f} GB/s "
                  f"of weights), LM head {native['lm_head_ms']:.2f} ms")
    print(f"matmul-only bound: W {bounds['W']:.0f} out tok/s, W1 {bounds['W1']:.0f} out tok/s")
    result = {"context": context, "bandwidth": bandwidth, "matmuls": rates, "matmul_bound_out_tok_s": bounds}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

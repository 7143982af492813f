"""What quantization costs in quality: perplexity of the embedded SmolLM2 over tests/data/coriolanus_act1.txt (a
public-domain text, about 4,300 tokens) in windows of `--window` tokens, for each `--quantization` setting, and the
mean and largest |difference| of each token's log-probability against the first setting's.

`none` is the GGUF file dequantized by its own block math (gguf-py's), the reference every other setting is
measured against. Each setting also reports the bytes of its weights (without dense copies).

Example: .venv/bin/python scripts/bench_quality.py --dtype bfloat16 --quantization none int8 auto int4
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from bench_common import cpu_model, git_commit, local_time, print_context
from engine import LLM
from engine.config import QUANTIZATIONS
from engine.perplexity import perplexity, token_logprobs

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "coriolanus_act1.txt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantization", nargs="+", default=["none", "int8", "auto", "int4"], choices=QUANTIZATIONS)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--window", type=int, default=512, help="tokens per scored window")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    return parser.parse_args()


def measure(quantization: str, args: argparse.Namespace) -> tuple[torch.Tensor, int]:
    """(each token's log-probability, bytes of the weights without dense copies)."""
    llm = LLM(dtype=args.dtype, quantization=quantization, num_kv_blocks=-(-args.window // 16))
    token_ids = llm.get_tokenizer().encode(TEXT.read_text())
    logprobs = token_logprobs(llm.engine.runner, token_ids, args.window)
    return logprobs, llm.engine.runner.model.weight_bytes()[0]


def row(quantization: str, logprobs: torch.Tensor, weight_bytes: int, reference: torch.Tensor) -> dict[str, Any]:
    difference = (logprobs - reference).abs()
    return {
        "quantization": quantization, "tokens_scored": len(logprobs), "perplexity": perplexity(logprobs),
        "mean_abs_logprob_diff": difference.mean().item(), "max_abs_logprob_diff": difference.max().item(),
        "weight_mib": weight_bytes / 2**20,
    }


def main() -> None:
    args = parse_args()
    context = {"machine": cpu_model(), "date": local_time(), "git_commit": git_commit(), "dtype": args.dtype,
               "window": args.window, "text": TEXT.name}
    print_context(context)
    measured = {quantization: measure(quantization, args) for quantization in args.quantization}
    reference = measured[args.quantization[0]][0]
    rows = [row(quantization, *values, reference) for quantization, values in measured.items()]
    print(f"\n{'quantization':<13} {'tokens':>7} {'perplexity':>11} {'mean |d|':>9} {'max |d|':>8} {'weights MiB':>12}")
    for r in rows:
        print(f"{r['quantization']:<13} {r['tokens_scored']:>7} {r['perplexity']:>11.3f} "
              f"{r['mean_abs_logprob_diff']:>9.4f} {r['max_abs_logprob_diff']:>8.3f} {r['weight_mib']:>12.1f}")
    if args.json:
        args.json.write_text(json.dumps({"context": context, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

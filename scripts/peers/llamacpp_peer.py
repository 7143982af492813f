"""llama-cpp-python as a bench_offline.py peer; runs in the venv built by scripts/setup_peers.sh.

Many requests go through llama.cpp's batch API at once, each its own sequence in a non-unified KV cache:
prompts are decoded in `n_batch`-token batches, then every step decodes one token per sequence; a greedy
sampler picks each token inside llama.cpp.
"""
from __future__ import annotations

from typing import Any

import llama_cpp

from protocol import read_job, run_job

BATCH_TOKENS = 2048


class LlamaCppBatchGenerator:
    def __init__(self, job: dict[str, Any]) -> None:
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(job["gguf_file"].encode(), llama_cpp.llama_model_default_params())
        self.max_seqs = job["max_num_seqs"]
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.max_seqs * job["max_model_len"]
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = self.max_seqs
        params.n_threads = params.n_threads_batch = job["threads"]
        params.kv_unified = False
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self.sampler, llama_cpp.llama_sampler_init_greedy())

    def generate(self, prompts: list[list[int]], output_len: int) -> int:
        produced = 0
        for start in range(0, len(prompts), self.max_seqs):
            produced += self._generate_group(prompts[start : start + self.max_seqs], output_len)
        return produced

    def _generate_group(self, prompts: list[list[int]], output_len: int) -> int:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        entries = [(seq, pos, token, pos == len(ids) - 1) for seq, ids in enumerate(prompts) for pos, token in enumerate(ids)]
        last_tokens = self._decode(entries)
        outputs = [[token] for token in last_tokens]
        for step in range(1, output_len):
            entries = [(seq, len(ids) + step - 1, outputs[seq][-1], True) for seq, ids in enumerate(prompts)]
            for seq, token in enumerate(self._decode(entries)):
                outputs[seq].append(token)
        return sum(len(tokens) for tokens in outputs)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode (sequence, position, token, wants_logits) entries in batches; the sampled tokens, in order."""
        sampled = []
        for start in range(0, len(entries), BATCH_TOKENS):
            chunk = entries[start : start + BATCH_TOKENS]
            batch = self.batch
            for i, (seq, pos, token, wants_logits) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, wants_logits
            batch.n_tokens = len(chunk)
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = [i for i, entry in enumerate(chunk) if entry[3]]
            sampled.extend(llama_cpp.llama_sampler_sample(self.sampler, self.ctx, row) for row in rows)
        return sampled


def main() -> None:
    job, result_path = read_job()
    run_job(job, result_path, LlamaCppBatchGenerator(job).generate)


if __name__ == "__main__":
    main()

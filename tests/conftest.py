"""Shared fixtures: tiny random-weight Hugging Face models, the embedded SmolLM2, engine caching and
the check that every test leaves all KV blocks free."""
from __future__ import annotations

import gc
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run on the CPU, before anything imports them

from engine import LLM, LLMEngine, RequestOutput, SamplingParams
from engine.block_manager import BlockManager
from engine.loader import default_model_path
from engine.scheduler import ScheduledSeq
from engine.sequence import Request, Sequence
from handler.model_store import build_archive
from handler.server import ServedModel, TorchServeProcess
from ts_server import EXAMPLE_PLUGINS, STARTUP_TIMEOUT, plugin_model_configs, small_model_config, torchserve_process

PROMPT = [510, 3458, 282, 4649, 314, 253, 1345, 30]  # " disrong of France is a real." in the SmolLM2 vocabulary
TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    vocab_size=49152,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3": dict(
        model_type="llama",
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=True,
    ),
    "mistral": dict(model_type="mistral", num_key_value_heads=1, sliding_window=None, rope_theta=1e6),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1e6),
    # A vocabulary that two ranks cannot split evenly: the second rank's shard ends in a padding row.
    "llama_odd_vocab": dict(model_type="llama", vocab_size=49155, tie_word_embeddings=True),
}

SESSION_DEFAULT_MAX_TOKENS = 64
_live_engines: list[Any] = []  # LLM or AsyncLLMEngine: anything with an `.engine`


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    """SmolLM2's tokenizer saved as a Hugging Face folder, shared by the tiny models."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name).save_pretrained(folder)
    return folder


def build_tiny_model(kind: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Save a random-weight model of `kind` with transformers, plus the shared tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**TINY_COMMON, **TINY_CONFIGS[kind]}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = build_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"), tokenizer_dir)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def llm_factory() -> Iterator[Callable[..., LLM]]:
    """Engines are costly to build: one per distinct set of arguments, for the whole session."""
    cache: dict[str, LLM] = {}

    def make(model: Any = None, **kwargs: Any) -> LLM:
        kwargs.setdefault("dtype", "float32")  # token-exact comparisons need it; `auto` is bfloat16 on some CPUs
        key = repr((str(model), sorted(kwargs.items())))
        if key not in cache:
            cache[key] = LLM(model=str(model) if model else None, **kwargs)
            _live_engines.append(cache[key])
        return cache[key]

    yield make
    for llm in cache.values():
        llm.shutdown()
    _live_engines.clear()
    cache.clear()
    gc.collect()


@pytest.fixture
def alone_llm(tiny_model: Callable[[str], Path], llm_factory: Callable[..., LLM]) -> LLM:
    """The tiny llama with room for every test's prompts and no prefix caching: the reference outputs."""
    return llm_factory(tiny_model("llama"), num_kv_blocks=512, enable_prefix_caching=False)


@pytest.fixture(autouse=True)
def all_blocks_free_after_test() -> Iterator[None]:
    yield
    for live in _live_engines:
        stats = live.engine.stats()
        assert not live.engine.has_unfinished_requests(), "a request was left in the engine"
        assert stats.blocks.num_free_blocks == stats.blocks.num_total_blocks, f"KV blocks leaked: {stats.blocks}"


def track_engine(live: Any) -> Any:
    """Include an engine built outside `llm_factory` in the after-test block check."""
    _live_engines.append(live)
    return live


def random_prompts(count: int, min_len: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def token_ids(outputs: list[RequestOutput]) -> list[list[int]]:
    """Each request's first completion's token ids."""
    return [out.outputs[0].token_ids for out in outputs]


def make_request(prompt_token_ids: list[int], n: int = 1) -> Request:
    """A request that never enters an engine, for tests that drive the block manager or scheduler by hand."""
    return Request(f"r{id(prompt_token_ids)}", None, prompt_token_ids, SamplingParams(n=n))


def make_seq(prompt_token_ids: list[int]) -> Sequence:
    return make_request(prompt_token_ids).seqs[0]


def complete_step(manager: BlockManager, scheduled: list[ScheduledSeq], next_token: int = 7) -> None:
    """What the engine does once the model has run a scheduled step, with `next_token` as every sampled token."""
    for item in scheduled:
        samples = item.completes_prompt
        item.seq.num_computed_tokens += item.num_new_tokens
        manager.cache_computed_blocks(item.seq)
        if samples:
            item.seq.token_ids.append(next_token)


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedModel]:
    """One TorchServe for the session: the embedded SmolLM2 as `smollm2` version 1.0, token auth off, model API on.
    A chat request without max_tokens stops after SESSION_DEFAULT_MAX_TOKENS (the fuzz tests send many).

    Attributes: model_name, model_version, inference_url, management_url, metrics_url, predictions_url
    (.../predictions/NAME/VERSION), openai_base_url (predictions_url + "/v1"), server (the TorchServeProcess).
    """
    root = tmp_path_factory.mktemp("ts")
    config = small_model_config()
    config["handler"]["limits"] = {"default_max_tokens": SESSION_DEFAULT_MAX_TOKENS}
    folder = build_archive("smollm2", "1.0", config, root / "store")
    with torchserve_process(root, {"smollm2": folder.name}, token_auth=False, model_api=True) as server:
        server.wait_until_ready("smollm2", "1.0", STARTUP_TIMEOUT)
        yield ServedModel(server, "smollm2", "1.0")


@pytest.fixture(scope="session")
def openai_client(torchserve: ServedModel) -> Any:
    """The real openai client on the session's TorchServe (no retries, so a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=torchserve.openai_base_url, api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def served_blocks_free(torchserve: ServedModel) -> Iterator[None]:
    """After the test, the session's TorchServe has no live request and every KV block free."""
    from ts_http import wait_all_blocks_free

    yield
    wait_all_blocks_free(torchserve.management_url, torchserve.model_name, torchserve.model_version)


@dataclass
class PluginServer:
    """One TorchServe serving the plugin tests' models (tests/ts_server.py's plugin_model_configs), version 1.0."""

    server: TorchServeProcess
    models: dict[str, ServedModel]
    rag_cache_dir: Path  # the rag plugin's on-disk index cache
    guard_model: Path  # the stand-in guard: the tiny random llama

    @property
    def model_log(self) -> str:
        return (self.server.run_dir / "logs" / "model_log.log").read_text(errors="replace")


_plugin_servers: list[TorchServeProcess] = []
PLUGIN_SERVER = "plugin_server"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests on the plugin server run first and together: it stops after the last of them (below), so that its
    workers' memory is free for the rest of the session."""
    items.sort(key=lambda item: PLUGIN_SERVER not in getattr(item, "fixturenames", ()))


def pytest_runtest_teardown(item: pytest.Item, nextitem: Optional[pytest.Item]) -> None:
    if PLUGIN_SERVER in getattr(item, "fixturenames", ()) and (
            nextitem is None or PLUGIN_SERVER not in getattr(nextitem, "fixturenames", ())):
        for server in _plugin_servers:
            server.stop()


@pytest.fixture(scope="session")
def plugin_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> Iterator[PluginServer]:
    """The users' example plugins are shipped in the assistant's model folder, as a user would ship them."""
    root = tmp_path_factory.mktemp("plugins")
    configs = plugin_model_configs(root / "rag-index", tiny_model("llama"))
    folders = {name: build_archive(name, "1.0", config, root / "store") for name, config in configs.items()}
    (folders["assistant"] / EXAMPLE_PLUGINS.name).write_bytes(EXAMPLE_PLUGINS.read_bytes())
    models = {name: folder.name for name, folder in folders.items()}
    with torchserve_process(root, models, token_auth=False, model_api=True) as server:
        _plugin_servers.append(server)
        for name in models:
            server.wait_until_ready(name, "1.0", STARTUP_TIMEOUT)
        served = {name: ServedModel(server, name, "1.0") for name in models}
        yield PluginServer(server, served, root / "rag-index", tiny_model("llama"))


@pytest.fixture(scope="session")
def native_kernels() -> None:
    """The native CPU kernels, built once (or loaded from the on-disk cache) for the session."""
    from engine.native.build import load_native

    load_native()


def run_to_completion(engine: LLMEngine, requests: list[Request]) -> dict[str, RequestOutput]:
    """Add `requests` to `engine` and step it until idle; each request's deltas folded into one, by request id."""
    for request in requests:
        engine.add_request(request)
    results: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.request_id in results:
                results[delta.request_id].add(delta)
            else:
                results[delta.request_id] = delta
    return results


async def stream_token_ids(stream: AsyncIterator[RequestOutput]) -> list[int]:
    """Every token id a stream of deltas yields for the first completion, in order."""
    return [token for output in [out async for out in stream] for token in output.outputs[0].token_ids]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@dataclass(frozen=True)
class TinyAdapters:
    """Random PEFT adapters for the tiny llama (tests/lora_adapters.py): `full` targets every projection at rank 8,
    `rslora` rank 4 with rsLoRA scaling, `attention_qv` q_proj and v_proj only at rank 16."""

    base: Path
    full: Path
    rslora: Path
    attention_qv: Path

    def requests(self) -> list[Any]:
        from engine.lora import LoRARequest

        return [LoRARequest(name, str(getattr(self, name))) for name in ("full", "rslora", "attention_qv")]


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model: Callable[[str], Path]) -> TinyAdapters:
    from lora_adapters import make_peft_adapter

    base, root = tiny_model("llama"), tmp_path_factory.mktemp("adapters")
    return TinyAdapters(
        base,
        make_peft_adapter(base, root / "full", rank=8, seed=1),
        make_peft_adapter(base, root / "rslora", rank=4, alpha=8, seed=2, use_rslora=True),
        make_peft_adapter(base, root / "attention_qv", rank=16, seed=3, targets=("q_proj", "v_proj")),
    )

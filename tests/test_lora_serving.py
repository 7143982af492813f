"""LoRA adapters through a real TorchServe: the tiny random llama as `tiny-lora` with TWO workers, registered on the
session's server for this module, with one adapter from its YAML (`handler.lora_modules`) and others loaded and
unloaded at runtime through `v1/load_lora_adapter` and `v1/unload_lora_adapter`.

Which worker answered a request is read from the frontend's log, which names the worker that took each job:
`W-9001-tiny-lora_1.0 ... Adding job to jobs: <request id>`, the id TorchServe returns as `x-request-id`.
"""
from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from engine import SamplingParams
from engine.lora import LoRARequest
from handler.model_store import build_archive, model_yaml
from handler.server import ServedModel
from lora_adapters import make_peft_adapter
from metrics_scrape import Scrape, wait_for_scrape
from ts_http import http, management_call
from ts_server import small_model_config

NAME, VERSION = "tiny-lora", "1.0"
ENGINE = {"max_model_len": 512, "kv_cache_memory_gb": 0.05, "dtype": "float32", "max_num_seqs": 8,
          "enable_lora": True, "max_lora_rank": 8}
YAML_ADAPTER = "yaml-lora"  # in handler.lora_modules, as a folder relative to the model folder
RUNTIME_ADAPTER = "runtime-lora"  # loaded at runtime from a folder inside the model folder, by relative path
PROMPT = [510, 3458, 282, 4649, 314, 253, 1345, 30]
GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True}
LOAD, UNLOAD = "load_lora_adapter", "unload_lora_adapter"
ROUNDS = 10  # at most this many rounds of 4 requests until every worker has answered one
JOB = re.compile(rf"(W-\d+)-{re.escape(NAME)}_{re.escape(VERSION)} \S+ - Adding job to jobs: ([\w-]+)")


@dataclass
class LoRAModel:
    served: ServedModel
    folder: Path  # the model folder, where the registry file lives
    base: Path  # the tiny llama's weights
    adapters: dict[str, Path]  # test adapters outside the model folder, by what is wrong with them


@dataclass
class Reply:
    status: int
    body: Any
    request_id: str  # TorchServe's, from x-request-id


@pytest.fixture(scope="module")
def lora_model(torchserve: ServedModel, tiny_model: Callable[[str], Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoRAModel]:
    base = tiny_model("llama")
    config = model_yaml(small_model_config(**ENGINE), str(base), {})
    config.update(minWorkers=2, maxWorkers=2)
    config["handler"]["lora_modules"] = {YAML_ADAPTER: f"adapters/{YAML_ADAPTER}"}
    folder = build_archive(NAME, VERSION, config, torchserve.server.config.model_store)
    make_peft_adapter(base, folder / "adapters" / YAML_ADAPTER, rank=8, seed=1)
    make_peft_adapter(base, folder / "adapters" / RUNTIME_ADAPTER, rank=4, alpha=8, seed=2)
    adapters = broken_adapters(base, tmp_path_factory.mktemp("lora-adapters"))
    path = f"/models?url={folder.name}&model_name={NAME}&initial_workers=2&synchronous=true"
    status, body = management_call(torchserve.management_url, "POST", path)
    assert status == 200, body
    yield LoRAModel(ServedModel(torchserve.server, NAME, VERSION), folder, base, adapters)
    status, body = management_call(torchserve.management_url, "DELETE", f"/models/{NAME}/{VERSION}")
    assert status == 200, body


def broken_adapters(base: Path, root: Path) -> dict[str, Path]:
    """A valid spare, and one adapter per way of being refused."""
    spare = make_peft_adapter(base, root / "spare", rank=8, seed=3)
    make_peft_adapter(base, root / "rank16", rank=16, seed=4)
    (root / "malformed").mkdir()
    (root / "malformed" / "adapter_config.json").write_text("{not json")
    shutil.copytree(spare, root / "foreign_target")
    config = json.loads((spare / "adapter_config.json").read_text())
    config["target_modules"] = [*config["target_modules"], "lm_head"]
    (root / "foreign_target" / "adapter_config.json").write_text(json.dumps(config))
    return {"spare": spare, "rank16": root / "rank16", "malformed": root / "malformed",
            "foreign_target": root / "foreign_target"}


def post(model: LoRAModel, route: str, body: Any) -> Reply:
    request = urllib.request.Request(f"{model.served.openai_base_url}/{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return Reply(response.status, json.loads(response.read()), response.headers["x-request-id"])
    except urllib.error.HTTPError as error:
        return Reply(error.code, json.loads(error.read()), error.headers["x-request-id"])


def complete(model: LoRAModel, adapter: str) -> Reply:
    return post(model, "completions", {"model": adapter, "prompt": PROMPT, **GREEDY})


def client(model: LoRAModel) -> openai.OpenAI:
    return openai.OpenAI(base_url=model.served.openai_base_url, api_key="unused", max_retries=0, timeout=300)


def workers(model: LoRAModel) -> dict[str, int]:
    """The model's TorchServe workers: the name the frontend's log gives each (W-PORT) -> its pid."""
    status, described = management_call(model.served.management_url, "GET", f"/models/{NAME}/{VERSION}")
    assert status == 200, described
    return {f"W-{worker['id']}": worker["pid"] for worker in described[0]["workers"]}


def answering_workers(model: LoRAModel, replies: list[Reply], log_from: int, timeout: float = 10.0) -> dict[str, str]:
    """Request id -> the worker that took it, from the frontend's log past `log_from` (written a moment after)."""
    wanted, deadline = {reply.request_id for reply in replies}, time.monotonic() + timeout
    while True:
        with model.served.server.log_path.open("rb") as log:
            log.seek(log_from)
            jobs = JOB.findall(log.read().decode(errors="replace"))
        found = {request_id: worker for worker, request_id in jobs if request_id in wanted}
        if len(found) == len(wanted) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def until_every_worker_answered(model: LoRAModel, send: Callable[[], Reply]) -> list[Reply]:
    """Replies to `send`, 4 at a time, until each worker of the model has answered at least one of them."""
    replies: list[Reply] = []
    log_from = model.served.server.log_path.stat().st_size
    for _ in range(ROUNDS):
        with ThreadPoolExecutor(4) as pool:
            replies += [future.result() for future in [pool.submit(send) for _ in range(4)]]
        answered = answering_workers(model, replies, log_from)
        if set(answered.values()) == set(workers(model)):
            return replies
    raise AssertionError(f"not every worker answered one of {len(replies)} requests: {answered}")


def test_models_lists_the_base_and_the_yaml_adapter_with_its_parent(lora_model: LoRAModel) -> None:
    listed = client(lora_model).models.list().data
    assert [model.id for model in listed] == [NAME, YAML_ADAPTER]
    adapter = listed[1].model_dump()
    assert adapter["object"] == "model" and adapter["owned_by"] == "pagedserve"
    assert adapter["parent"] == NAME and adapter["root"] == YAML_ADAPTER, "the folder's name, never its path"


def test_an_adapter_changes_greedy_chat_and_each_model_is_deterministic(lora_model: LoRAModel) -> None:
    def chat(model: Any) -> str:
        body = {"messages": [{"role": "user", "content": "Name three colors."}], **GREEDY}
        reply = post(lora_model, "chat/completions", {**body, "model": model} if model else body)
        assert reply.status == 200 and reply.body["model"] == (model or NAME), reply.body
        return reply.body["choices"][0]["message"]["content"]

    base, adapted = chat(NAME), chat(YAML_ADAPTER)
    assert adapted != base
    assert chat(None) == base and chat(YAML_ADAPTER) == adapted


def test_a_served_adapter_generates_what_the_offline_engine_does_with_it(
        lora_model: LoRAModel, llm_factory: Callable[..., Any]) -> None:
    llm = llm_factory(lora_model.base, **ENGINE)
    adapter = LoRARequest(YAML_ADAPTER, str(lora_model.folder / "adapters" / YAML_ADAPTER))
    [offline] = llm.generate([PROMPT], SamplingParams(**GREEDY), lora_request=adapter)
    reply = complete(lora_model, YAML_ADAPTER)
    assert reply.status == 200 and reply.body["choices"][0]["text"] == offline.outputs[0].text


def test_a_runtime_adapter_reaches_every_worker_and_its_unload_every_worker(lora_model: LoRAModel) -> None:
    pids = workers(lora_model)
    assert len(pids) == 2
    base_text = complete(lora_model, NAME).body["choices"][0]["text"]
    loaded = post(lora_model, LOAD, {"lora_name": RUNTIME_ADAPTER, "lora_path": f"adapters/{RUNTIME_ADAPTER}"})
    assert (loaded.status, loaded.body) == (200, {
        "status": "ok", "message": f"Success: LoRA adapter '{RUNTIME_ADAPTER}' added successfully."})
    served = until_every_worker_answered(lora_model, lambda: complete(lora_model, RUNTIME_ADAPTER))
    texts = {reply.body["choices"][0]["text"] for reply in served if reply.status == 200}
    assert [reply.status for reply in served] == [200] * len(served) and len(texts) == 1 and texts != {base_text}
    card = next(m for m in client(lora_model).models.list().data if m.id == RUNTIME_ADAPTER).model_dump()
    assert card["parent"] == NAME and card["root"] == RUNTIME_ADAPTER

    unloaded = post(lora_model, UNLOAD, {"lora_name": RUNTIME_ADAPTER})
    assert (unloaded.status, unloaded.body["message"]) == (
        200, f"Success: LoRA adapter '{RUNTIME_ADAPTER}' removed successfully.")
    refused = until_every_worker_answered(lora_model, lambda: complete(lora_model, RUNTIME_ADAPTER))
    assert {(reply.status, reply.body["error"]["code"]) for reply in refused} == {(404, "model_not_found")}
    assert RUNTIME_ADAPTER not in [m.id for m in client(lora_model).models.list().data]
    again = post(lora_model, UNLOAD, {"lora_name": RUNTIME_ADAPTER})
    assert (again.status, again.body["error"]["code"]) == (404, "lora_adapter_not_found")
    assert workers(lora_model) == pids, "no worker was restarted"


def test_unloading_lets_a_running_request_finish_and_refuses_new_ones(lora_model: LoRAModel) -> None:
    path = str(lora_model.adapters["spare"])
    assert post(lora_model, LOAD, {"lora_name": "spare", "lora_path": path}).status == 200
    longest = {"model": "spare", "prompt": PROMPT, "max_tokens": ENGINE["max_model_len"] - len(PROMPT),
               "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client(lora_model).completions.create(**longest)
    stream = iter(client(lora_model).completions.create(**longest, stream=True))
    first = next(stream)  # the request runs: its prompt is computed, and hundreds of steps are to come
    assert post(lora_model, UNLOAD, {"lora_name": "spare"}).status == 200
    assert complete(lora_model, "spare").status == 404
    chunks = [first, *stream]
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


ERRORS = [  # route, body ("{name}": that test adapter's folder), status, the error's param, its message
    pytest.param(LOAD, {"lora_name": "ghost", "lora_path": "adapters/ghost"}, 400, "lora_path",
                 r"^LoRA adapter 'ghost': 'adapters/ghost' is not a folder$", id="missing_folder"),
    pytest.param(LOAD, {"lora_name": "malformed", "lora_path": "{malformed}"}, 400, "lora_path",
                 r"adapter_config.json is not valid JSON", id="malformed_config"),
    pytest.param(LOAD, {"lora_name": "rank16", "lora_path": "{rank16}"}, 400, "lora_path",
                 r"rank 16 exceeds max_lora_rank \(8\)", id="rank_above_max"),
    pytest.param(LOAD, {"lora_name": "foreign", "lora_path": "{foreign_target}"}, 400, "lora_path",
                 r"target modules \['lm_head'\] are not in this model's adapted projections", id="foreign_target"),
    pytest.param(LOAD, {"lora_name": NAME, "lora_path": "{spare}"}, 400, "lora_name",
                 rf"`{NAME}` is the served model's name", id="base_model_name"),
    pytest.param(LOAD, {"lora_name": YAML_ADAPTER, "lora_path": "{spare}"}, 400, "lora_name",
                 rf"The LoRA adapter `{YAML_ADAPTER}` is already loaded", id="already_loaded"),
    pytest.param(LOAD, {"lora_name": "spare"}, 400, "lora_path", r"^lora_path is required$", id="missing_field"),
    pytest.param(LOAD, {"lora_name": 7, "lora_path": "{spare}"}, 400, "lora_name",
                 r"^lora_name must be a string, got integer$", id="wrong_type"),
    pytest.param(LOAD, {"lora_name": "a:b", "lora_path": "{spare}"}, 400, "lora_name", r"lora_name must be 1 to",
                 id="bad_name"),
    pytest.param(LOAD, {"lora_name": "spare", "lora_path": "../../../etc"}, 400, "lora_path",
                 r"leaves the model folder", id="outside_model_folder"),
    pytest.param(UNLOAD, {"lora_name": "never-loaded"}, 404, "lora_name",
                 r"^The LoRA adapter `never-loaded` is not loaded$", id="unload_unknown"),
    pytest.param(UNLOAD, {"lora_name": YAML_ADAPTER}, 400, "lora_name", r"configured in handler.lora_modules",
                 id="unload_yaml_adapter"),
    pytest.param(UNLOAD, {"name": "spare"}, 400, "name", r"unrecognized request argument\(s\): name",
                 id="unknown_field"),
]


@pytest.mark.parametrize(("route", "body", "status", "param", "message"), ERRORS)
def test_a_refused_load_or_unload_names_the_problem_and_the_workers_keep_serving(
        lora_model: LoRAModel, route: str, body: dict[str, Any], status: int, param: str, message: str) -> None:
    pids = workers(lora_model)
    paths = {name: str(path) for name, path in lora_model.adapters.items()}
    sent = {key: value.format(**paths) if isinstance(value, str) else value for key, value in body.items()}
    reply = post(lora_model, route, sent)
    assert (reply.status, reply.body["error"]["param"]) == (status, param), reply.body
    assert re.search(message, reply.body["error"]["message"]), reply.body
    assert str(lora_model.folder) not in reply.body["error"]["message"], "no path of the server's in a reply"
    assert [complete(lora_model, model).status for model in (NAME, YAML_ADAPTER)] == [200, 200]
    assert workers(lora_model) == pids
    assert [m.id for m in client(lora_model).models.list().data] == [NAME, YAML_ADAPTER]


def test_without_enable_lora_the_runtime_routes_are_refused(torchserve: ServedModel) -> None:
    """The session's SmolLM2 serves no adapters: loading one is a 400, any other model name still a 404."""
    status, body = http(f"{torchserve.openai_base_url}/{LOAD}", body={"lora_name": "sql", "lora_path": "/sql"})
    assert (status, body["error"]["code"]) == (400, "lora_not_enabled")
    assert "handler.engine.enable_lora: true" in body["error"]["message"]
    status, body = http(f"{torchserve.openai_base_url}/completions", body={"model": "sql", "prompt": "Hi"})
    assert (status, body["error"]["message"]) == (
        404, f"The model `sql` does not exist; this endpoint serves `{torchserve.model_name}`")


def adapter_series(scraped: Scrape, served: ServedModel, adapter: str) -> dict[str, float]:
    """`lora_requests_*{worker_pid}` of one adapter, by metric and worker."""
    return {f"{s.name}:{s.labels['worker_pid']}": s.value for s in scraped.samples
            if s.name.startswith("lora_requests_") and s.labels.get("lora_name") == adapter
            and s.labels.get("model_name") == served.model_name}


def test_per_adapter_gauges_count_running_requests_then_fall_to_0(lora_model: LoRAModel) -> None:
    served = lora_model.served

    def run(i: int) -> Any:
        return client(lora_model).completions.create(
            model=YAML_ADAPTER, prompt=f"Count to {i + 100}:", max_tokens=400, extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, i) for i in range(2)]
        wait_for_scrape(served, lambda s: s.value("lora_requests_running", served, lora_name=YAML_ADAPTER) > 0)
        assert all(future.result().usage.completion_tokens == 400 for future in futures)
    rest = wait_for_scrape(served, lambda s: set(adapter_series(s, served, YAML_ADAPTER).values()) == {0})
    assert {name.split(":")[0] for name in adapter_series(rest, served, YAML_ADAPTER)} == {
        "lora_requests_running", "lora_requests_waiting"}

"""Versions side by side through TorchServe's management API: register, route, set-default, scale, unregister.

Version 1.0 is a no-archive folder loaded at startup, weights referenced; version 2.0 a .mar with the weights
inside, registered while the server runs.
"""
from __future__ import annotations

import time
import zipfile
from typing import Any, Iterator

import psutil
import pytest
import yaml

from handler.model_store import build_archive
from handler.server import ServedModel, TorchServeProcess
from ts_http import http, management_call
from ts_server import STARTUP_TIMEOUT, small_model_config, torchserve_process

NAME = "smollm2"
ENGINE = {"max_num_seqs": 4, "max_model_len": 512}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServeProcess]:
    root = tmp_path_factory.mktemp("versions")
    store = root / "store"
    folder = build_archive(NAME, "1.0", small_model_config(**ENGINE), store)
    build_archive(NAME, "2.0", small_model_config(**ENGINE), store, archive_format="default", weights_inside=True)
    with torchserve_process(root, {NAME: folder.name}, token_auth=False, model_api=True) as running:
        running.wait_until_ready(NAME, "1.0", STARTUP_TIMEOUT)
        processes = [psutil.Process(running.process.pid), *psutil.Process(running.process.pid).children(recursive=True)]
        path = f"/models?url={NAME}-2.0.mar&model_name={NAME}&initial_workers=1&synchronous=true"
        status, body = management_call(running.management_url, "POST", path)
        assert status == 200, body
        yield running
    assert psutil.wait_procs(processes, timeout=5)[1] == []


def workers(server: TorchServeProcess, version: str) -> list[str]:
    status, described = management_call(server.management_url, "GET", f"/models/{NAME}/{version}")
    assert status == 200, described
    return [worker["status"] for worker in described[0]["workers"]]


def settled_workers(server: TorchServeProcess, version: str, expected: list[str], timeout: float = 10.0) -> list[str]:
    """The workers' statuses once they equal `expected`, or as they are after `timeout`.

    A synchronous scale returns a moment before the new worker's status turns READY: TorchServe 0.12.0's async
    worker answers the waiting request first and sets the state after.
    """
    deadline = time.monotonic() + timeout
    while (statuses := workers(server, version)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return statuses


def complete(server: TorchServeProcess, version: str) -> tuple[int, Any]:
    served = ServedModel(server, NAME, version)
    return http(f"{served.openai_base_url}/completions", body={"prompt": "Hi", "max_tokens": 4})


def test_the_mar_holds_the_weights_and_names_them_relative_to_the_model_dir(server: TorchServeProcess) -> None:
    with zipfile.ZipFile(server.config.model_store / f"{NAME}-2.0.mar") as archive:
        config = yaml.safe_load(archive.read("model-config.yaml"))
        assert config["handler"]["model"] in archive.namelist()
        assert config["handler"]["engine"]["max_num_seqs"] == 4


def test_each_version_answers_on_its_own_route(server: TorchServeProcess) -> None:
    for version in ("1.0", "2.0"):
        status, body = complete(server, version)
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
        status, models = http(f"{ServedModel(server, NAME, version).openai_base_url}/models", method="GET")
        assert status == 200 and models["data"][0]["version"] == version
    status, listed = management_call(server.management_url, "GET", f"/models/{NAME}/all")
    assert sorted(model["modelVersion"] for model in listed) == ["1.0", "2.0"]


def test_set_default_moves_the_default_version(server: TorchServeProcess) -> None:
    def default_version() -> str:
        return management_call(server.management_url, "GET", f"/models/{NAME}")[1][0]["modelVersion"]

    assert default_version() == "1.0"
    assert management_call(server.management_url, "PUT", f"/models/{NAME}/2.0/set-default")[0] == 200
    assert default_version() == "2.0"
    assert management_call(server.management_url, "PUT", f"/models/{NAME}/1.0/set-default")[0] == 200
    assert default_version() == "1.0"


def test_scale_to_two_workers_and_back_to_one(server: TorchServeProcess) -> None:
    status, body = management_call(server.management_url, "PUT", f"/models/{NAME}/2.0?min_worker=2&synchronous=true")
    assert status == 200, body
    assert settled_workers(server, "2.0", ["READY", "READY"]) == ["READY", "READY"]
    assert complete(server, "2.0")[0] == 200
    status, body = management_call(server.management_url, "PUT", f"/models/{NAME}/2.0?min_worker=1&synchronous=true")
    assert status == 200, body
    assert settled_workers(server, "2.0", ["READY"]) == ["READY"]
    assert complete(server, "2.0")[0] == 200


def test_unregister_removes_the_version(server: TorchServeProcess) -> None:
    """Last in this module: version 2.0 is gone afterwards."""
    status, body = management_call(server.management_url, "DELETE", f"/models/{NAME}/2.0")
    assert status == 200, body
    assert management_call(server.management_url, "GET", f"/models/{NAME}/2.0")[0] == 404
    assert complete(server, "2.0")[0] == 404
    assert [model["modelVersion"] for model in management_call(server.management_url, "GET", f"/models/{NAME}/all")[1]] == ["1.0"]
    assert complete(server, "1.0")[0] == 200

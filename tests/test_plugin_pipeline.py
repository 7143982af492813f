"""Users' plugins by import path, through a real TorchServe (the assistant model: tests/ts_server.py), and the
startup checks of the `handler.plugins` list."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from handler.config import HandlerConfig
from handler.launcher import main as launcher_main
from ts_http import http, http_bytes
from ts_server import PLUGGED_MAX_TOKENS


@pytest.fixture(scope="module")
def client(plugin_server: Any) -> openai.OpenAI:
    base_url = plugin_server.models["assistant"].openai_base_url
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def chat(client: openai.OpenAI, content: str, **extra: Any) -> Any:
    return client.chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": content}], temperature=0, max_tokens=200,
        extra_body={"rag": False, **extra},
    )


def test_a_plugin_by_import_path_rewrites_the_request(client: openai.OpenAI) -> None:
    rewritten = chat(client, "What is the capital of Zorblat?")
    direct = chat(client, "What is the capital of France?")
    assert rewritten.choices[0].message.content == direct.choices[0].message.content
    assert rewritten.usage.completion_tokens <= PLUGGED_MAX_TOKENS  # its max_tokens cap, though 200 was asked


def test_a_plugin_may_answer_a_request_itself(client: openai.OpenAI) -> None:
    response = chat(client, "/help me")
    assert response.choices[0].message.content == "Ask me anything."
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.total_tokens == 0
    stream = client.chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "/help"}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "Ask me anything."


def test_an_output_filter_rewrites_streamed_and_whole_text(client: openai.OpenAI) -> None:
    question = "Count from 1 to 5, separated by commas."
    plain = chat(client, question).choices[0].message.content
    redacted = chat(client, question, redact=True).choices[0].message.content
    assert any(c.isdigit() for c in plain)
    assert redacted == "".join("#" if c.isdigit() else c for c in plain)
    stream = client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=200, stream=True,
                                            extra_body={"rag": False, "redact": True})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == redacted


def test_a_failing_plugin_fails_only_its_request(plugin_server: Any, client: openai.OpenAI) -> None:
    url = plugin_server.models["assistant"].openai_base_url + "/chat/completions"
    status, body = http(url, {"messages": [{"role": "user", "content": "please EXPLODE"}]})
    assert status == 500
    assert body["error"]["type"] == "server_error" and "fail_on plugin failed" in body["error"]["message"]
    assert chat(client, "Say hi.").choices[0].finish_reason in ("stop", "length")


def test_a_failing_output_filter_ends_only_its_stream(plugin_server: Any, client: openai.OpenAI) -> None:
    url = plugin_server.models["assistant"].openai_base_url + "/chat/completions"
    body = {"messages": [{"role": "user", "content": "Say hi."}], "fail_output": True, "rag": False}
    status, whole = http(url, body)
    assert status == 500 and "fail_on plugin failed" in whole["error"]["message"]
    status, streamed = http_bytes(url, {**body, "stream": True})
    events = [line for line in streamed.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and "fail_on plugin failed" in events[-2] and events[-1] == "data: [DONE]"
    assert chat(client, "Say hi.").choices[0].finish_reason in ("stop", "length")


def test_a_wrong_model_name_is_refused_before_the_plugins(plugin_server: Any) -> None:
    url = plugin_server.models["assistant"].openai_base_url + "/chat/completions"
    status, body = http(url, {"model": "gpt-4", "messages": [{"role": "user", "content": "please EXPLODE"}]})
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_an_unknown_request_field_is_still_a_400(plugin_server: Any) -> None:
    url = plugin_server.models["assistant"].openai_base_url + "/chat/completions"
    status, body = http(url, {"messages": [{"role": "user", "content": "hi"}], "retrieval": True})
    assert status == 400 and body["error"]["param"] == "retrieval"


@pytest.mark.parametrize("plugins, named", [
    ([{"plugin": "ragg"}], "unknown plugin 'ragg'"),
    ([{"plugin": "example_plugins:NoSuchClass"}], "cannot import 'example_plugins:NoSuchClass'"),
    ([{"plugin": "pathlib:Path"}], "is not a subclass"),
    ([{"plugin": "rag", "options": {"documents": "docs", "top_kk": 3}}], "top_kk"),
    ([{"plugin": "example_plugins:FailOn", "option": {}}], "handler.plugins[0]"),
    ([{"plugin": "rag", "options": {"documents": "docs", "mode": "vector"}}], "mode"),
    ({"plugin": "rag"}, "must be a list"),
])
def test_bad_plugin_entries_fail_at_startup_naming_them(plugins: Any, named: str) -> None:
    with pytest.raises(ValueError) as error:
        HandlerConfig.from_dict({"plugins": plugins})
    assert named in str(error.value)


def test_the_launcher_refuses_a_bad_plugin_before_java_starts(tmp_path: Path, capsys: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"handler": {"plugins": [{"plugin": "guard", "options": {"modle": "x"}}]}}))
    assert launcher_main(["--config", str(config)]) == 1
    assert "modle" in capsys.readouterr().err


def test_plugin_path_options_are_relative_to_the_launchers_config(tmp_path: Path) -> None:
    from handler.config import with_absolute_paths

    config = {"handler": {"plugins": [{"plugin": "rag", "options": {"documents": "docs", "top_k": 2}}],
                          "embedding_model": "/abs/model"}}
    resolved = with_absolute_paths(config, tmp_path)
    assert resolved["handler"]["plugins"][0]["options"] == {"documents": str(tmp_path / "docs"), "top_k": 2}
    assert resolved["handler"]["embedding_model"] == "/abs/model"

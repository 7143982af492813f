"""Our tool-aware SmolLM2 chat template: chats without tools render exactly as SmolLM2's own template renders them;
with tools it lists the functions and asks for <tool_call> blocks, which the hermes parser reads back. The default
model-config names it as a file, which `handler.chat_template` resolves like the other paths."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handler.chat_template import read_chat_template
from handler.config import HandlerConfig, handler_config, read_model_yaml
from handler.launcher import DEFAULT_CONFIG, base_config
from handler.model_store import CONFIG_FILE, build_archive
from handler.tool_calls.parsers import HermesToolParser, ToolCall

TEMPLATE_FILE = DEFAULT_CONFIG.parent / "chat_templates" / "smollm2_tools.jinja"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
PLAIN_CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another?"}],
    [{"role": "user", "content": "Hi"}, {"role": "system", "content": "A late system turn."},
     {"role": "assistant", "content": ""}],
]
CALLS = [{"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
         {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": {}}}]
TOOL_CHAT = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "a", "content": "22 C"},
    {"role": "tool", "tool_call_id": "b", "content": "noon"},
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def render(tokenizer: Any, messages: list[dict[str, Any]], **options: Any) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=TEMPLATE_FILE.read_text(), tokenize=False, **options)


@pytest.mark.parametrize("messages", PLAIN_CHATS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chats_without_tools_render_as_smollm2_s_own_template(
    tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool
) -> None:
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert render(tokenizer, messages, add_generation_prompt=generation_prompt) == theirs


def test_tools_are_listed_in_the_system_turn(tokenizer: Any) -> None:
    text = render(tokenizer, PLAIN_CHATS[1], tools=TOOLS, add_generation_prompt=True)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    listed = system.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert [json.loads(line) for line in listed] == [tool["function"] for tool in TOOLS]
    assert "<tool_call>" in system and text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    default_system = render(tokenizer, PLAIN_CHATS[0], tools=TOOLS)
    assert default_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_calls_and_results_render_as_blocks_the_hermes_parser_reads_back(tokenizer: Any) -> None:
    text = render(tokenizer, TOOL_CHAT, tools=TOOLS, add_generation_prompt=True)
    turns = text.split("<|im_start|>")[1:]
    assistant, results = turns[2], turns[3]
    assert assistant.startswith("assistant\n") and assistant.endswith("<|im_end|>\n")
    parsed = HermesToolParser().parse(assistant.removeprefix("assistant\n").removesuffix("<|im_end|>\n"))
    assert parsed.content is None
    assert parsed.calls == [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", "{}")]
    assert results == ("user\n<tool_response>\n22 C\n</tool_response>\n<tool_response>\nnoon\n</tool_response>"
                       "<|im_end|>\n")
    assert turns[4] == "assistant\n"


def test_the_default_model_config_serves_this_template_with_the_hermes_parser() -> None:
    config = handler_config(base_config(None))
    assert read_chat_template(config.chat_template) == TEMPLATE_FILE.read_text()
    assert config.tool_call_parser == "hermes"


def test_chat_template_is_a_file_in_the_model_folder_or_the_template_itself(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    in_folder = HandlerConfig.from_dict({"chat_template": "templates/mine.jinja"}, str(tmp_path))
    assert read_chat_template(in_folder.chat_template) == "{{ messages[0]['content'] }}"
    assert read_chat_template(HandlerConfig.from_dict({"chat_template": "{{ 'inline' }}"}).chat_template) == (
        "{{ 'inline' }}")
    missing = HandlerConfig.from_dict({"chat_template": "templates/missing.jinja"}, str(tmp_path))
    with pytest.raises(ValueError, match="handler.chat_template: cannot read the template file"):
        read_chat_template(missing.chat_template)
    with pytest.raises(ValueError, match="leaves the model folder"):
        HandlerConfig.from_dict({"chat_template": "../elsewhere.jinja"}, str(tmp_path))
    with pytest.raises(ValueError, match="handler.tool_call_parser must be one of hermes, llama3_json"):
        HandlerConfig.from_dict({"tool_call_parser": "mistral"})


def test_an_archive_holds_the_template_s_text_not_the_path_of_its_file(tmp_path: Path) -> None:
    folder = build_archive("smollm2", "1.0", base_config(None), tmp_path)
    archived = read_model_yaml(str(folder / CONFIG_FILE))["handler"]
    assert archived["chat_template"] == TEMPLATE_FILE.read_text()
    assert handler_config({"handler": archived}, str(folder)).chat_template == archived["chat_template"]

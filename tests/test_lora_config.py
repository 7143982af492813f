"""Startup LoRA adapters in the model-config (`handler.lora_modules`) and the launcher's --lora_modules and
--enable_lora: checked at startup, each problem named by its key."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from handler.config import HandlerConfig, with_absolute_paths
from handler.launcher import apply_lora_flags, parser, split_engine_overrides


def lora_config(lora_modules: Any, engine: Any = None, model_dir: str = "/models/tiny-1.0") -> HandlerConfig:
    return HandlerConfig.from_dict({"lora_modules": lora_modules, "engine": engine or {}}, model_dir)


def test_relative_adapter_folders_are_in_the_model_folder_and_lora_is_turned_on(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="handler.config"):
        config = lora_config({"sql": "adapters/sql/", "chat": "/srv/chat"})
    assert config.lora_modules == {"sql": "/models/tiny-1.0/adapters/sql", "chat": "/srv/chat"}
    assert config.engine.enable_lora
    assert "handler.engine.enable_lora is turned on" in caplog.text


@pytest.mark.parametrize(("lora_modules", "engine", "message"), [
    (["sql"], None, r"handler.lora_modules must be a mapping, got list"),
    ({"my adapter": "a"}, None, r"handler.lora_modules: the adapter name 'my adapter' must be 1 to 128 letters"),
    ({"a,b": "a"}, None, r"the adapter name 'a,b' must be"),
    ({"sql": 3}, None, r"handler.lora_modules.sql must be a PEFT folder's path, got 3"),
    ({"sql": "../sql"}, None, r"handler.lora_modules.sql '../sql' leaves the model folder"),
    ({"sql": "sql"}, {"enable_lora": False}, r"handler.lora_modules needs handler.engine.enable_lora: true, got False"),
    ({}, {"max_lora_rank": 0}, r"max_lora_rank must be a positive integer"),
])
def test_a_bad_setting_is_refused_naming_its_key(lora_modules: Any, engine: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lora_config(lora_modules, engine)


def test_no_adapters_leave_lora_as_the_engine_section_says() -> None:
    assert not lora_config({}).engine.enable_lora
    assert lora_config({}, {"enable_lora": True}).engine.enable_lora


def test_a_config_file_names_adapter_folders_beside_itself(tmp_path: Path) -> None:
    config = with_absolute_paths({"handler": {"lora_modules": {"sql": "adapters/sql", "chat": "/srv/chat"}}}, tmp_path)
    assert config["handler"]["lora_modules"] == {"sql": str(tmp_path / "adapters/sql"), "chat": "/srv/chat"}


def test_the_launcher_flags_add_adapters_from_the_current_folder_and_turn_lora_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    flags = ["--lora-modules", "sql=adapters/sql", "chat=/srv/chat", "--enable-lora"]
    args, _ = split_engine_overrides(parser(), flags)
    config = {"handler": {"lora_modules": {"yaml": "/srv/yaml"}, "engine": {"max_num_seqs": 8}}}
    applied = apply_lora_flags(config, args.lora_modules, args.enable_lora)
    assert applied["handler"] == {
        "lora_modules": {"yaml": "/srv/yaml", "sql": str(tmp_path / "adapters/sql"), "chat": "/srv/chat"},
        "engine": {"max_num_seqs": 8, "enable_lora": True},
    }
    assert apply_lora_flags(config, [], False) == config


def test_a_launcher_adapter_without_its_path_is_refused() -> None:
    with pytest.raises(ValueError, match=r"--lora_modules takes NAME=PATH pairs, got 'sql'"):
        apply_lora_flags({"handler": {}}, ["sql"], False)

"""Static API keys (`handler.api_key_file`, the launcher's --api_key_file): reading the file and checking a
request's Authorization header. The served behaviour is in test_entrypoint.py, through a real TorchServe."""
from __future__ import annotations

from pathlib import Path

import pytest

from handler.api_error import APIError
from handler.api_keys import MIN_KEY_LENGTH, check_api_key, read_api_keys
from handler.config import HandlerConfig, with_absolute_paths
from handler.launcher import apply_api_key_file

KEY = "k" * MIN_KEY_LENGTH


def test_keys_are_one_per_line_without_blank_lines_or_surrounding_spaces(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"\n  {KEY}a  \n\n{KEY}b\n")
    assert read_api_keys(tmp_path / "keys") == (f"{KEY}a".encode(), f"{KEY}b".encode())


@pytest.mark.parametrize("text, message", [
    ("\n \n", "holds no key"),
    (f"{KEY}\nchange-me\n", f"a key of 9 characters; keys need at least {MIN_KEY_LENGTH}"),
])
def test_an_empty_file_or_a_short_key_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "keys").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_api_keys(tmp_path / "keys")


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}, {"AUTHORIZATION": f"Bearer  {KEY} "},
])
def test_a_bearer_key_of_the_file_passes_whatever_the_header_case(headers: dict[str, str]) -> None:
    check_api_key((b"other-key-0123456789", KEY.encode()), headers)


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {KEY}"},
    {"Authorization": f"Bearer {KEY}x"}, {"X-Api-Key": KEY},
])
def test_anything_else_is_a_401_naming_the_header(headers: dict[str, str]) -> None:
    with pytest.raises(APIError) as caught:
        check_api_key((KEY.encode(),), headers)
    assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")
    assert "Authorization: Bearer KEY" in caught.value.message


def test_a_relative_key_file_is_in_the_model_folder_or_beside_a_config_file(tmp_path: Path) -> None:
    assert HandlerConfig.from_dict({"api_key_file": "keys"}, str(tmp_path)).api_key_file == str(tmp_path / "keys")
    with pytest.raises(ValueError, match="handler.api_key_file '../keys' leaves the model folder"):
        HandlerConfig.from_dict({"api_key_file": "../keys"}, str(tmp_path))
    config = with_absolute_paths({"handler": {"api_key_file": "secrets/keys"}}, tmp_path)
    assert config["handler"]["api_key_file"] == str(tmp_path / "secrets" / "keys")


def test_the_launcher_refuses_a_missing_key_file_before_starting_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"api_key_file .*/missing: No such file or directory"):
        apply_api_key_file({"handler": {}}, tmp_path / "missing")
    (tmp_path / "keys").write_text(KEY)
    expected = {"handler": {"api_key_file": str(tmp_path / "keys")}}
    assert apply_api_key_file({"handler": {}}, tmp_path / "keys") == expected

"""The Dockerfiles without a Docker engine: hadolint, and our own checks of what matters for the images (non-root
user, pinned bases, health check, no secrets, no build tools in the final stage, COPY sources inside the build
context, ports as the launcher's defaults)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from handler.launcher import parser

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = (DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu")
APP_DIR = "/opt/pagedserve"
KEY_DIR = "/var/lib/pagedserve/keys"
BUILD_TOOLS = {"g++", "gcc", "build-essential", "clang", "make", "cmake"}
# Triton compiles its CUDA driver module with a C compiler when the first kernel runs (see Dockerfile.gpu).
ALLOWED_BUILD_TOOLS = {"Dockerfile.cpu": set(), "Dockerfile.gpu": {"gcc"}}
# A name such as API_KEY or HF_TOKEN; KEY_DIR, KEY_FILE and the like hold paths.
SECRET_NAME = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET)(?!_(DIR|FILE|PATH)\b)", re.IGNORECASE)
SECRET_FILE = re.compile(r"(^|/)(key_file\.json|\.env(\..*)?|[^/]*\.(key|pem))$")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """The instructions, continuation lines joined and comment lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(stripped.removesuffix("\\").strip())
        if not stripped.endswith("\\"):
            keyword, _, args = " ".join(pending).partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip(), start))
            pending = []
    return instructions


def stages(path: Path) -> list[list[Instruction]]:
    """The build stages, each from its FROM on."""
    result: list[list[Instruction]] = []
    for instruction in parse_dockerfile(path.read_text()):
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def final_stage(path: Path) -> list[Instruction]:
    return stages(path)[-1]


def find(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [instruction for instruction in stage if instruction.keyword == keyword]


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """`--name=value` flags and the remaining words of a COPY or HEALTHCHECK."""
    flags: dict[str, str] = {}
    words = shlex.split(args)
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, words


def apt_packages(run: str) -> set[str]:
    """Packages named by the `apt-get install` commands of a RUN."""
    packages: set[str] = set()
    for command in re.split(r"&&|;|\|\|", run):
        words = command.split()
        if words[:2] == ["apt-get", "install"]:
            packages |= {word.split("=")[0] for word in words[2:] if not word.startswith("-")}
    return packages


def env_pairs(instruction: Instruction) -> list[tuple[str, str]]:
    """(name, default) of an ENV or ARG; the default is "" where none is given."""
    words = shlex.split(instruction.args)
    if instruction.keyword == "ENV" and len(words) >= 2 and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [(word.partition("=")[0], word.partition("=")[2]) for word in words]


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, regex) for each .dockerignore line, in order."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _pattern_regex(line.removeprefix("!").strip("/"))))
    return rules


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A Docker ignore pattern as a regex matching the path, or any path under it."""
    parts = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]*\])", pattern)
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    regex = "".join(wildcards.get(part, part if part.startswith("[") else re.escape(part)) for part in parts)
    return re.compile(f"{regex}(?:/.*)?")


def ignored(path: str) -> bool:
    result = False
    for negate, regex in dockerignore_rules():
        if regex.fullmatch(path):
            result = not negate
    return result


def launcher_default(flag: str) -> int:
    return parser().get_default(flag)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--config", str(DOCKER / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_base_image_has_an_exact_tag(dockerfile: Path) -> None:
    for stage in stages(dockerfile):
        image = stage[0].args.split()[0]
        name, _, tag = image.rpartition(":") if ":" in image else (image, "", "")
        assert name and "$" not in image, f"line {stage[0].line}: {image} is not a fixed image"
        assert tag != "latest" and re.search(r"\d", tag), f"line {stage[0].line}: {image} has no exact tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_final_stage_runs_as_the_non_root_user_before_its_entrypoint(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    users, entrypoints = find(stage, "USER"), find(stage, "ENTRYPOINT")
    assert users and entrypoints
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    assert users[-1].line < entrypoints[-1].line
    created = " ".join(run.args for run in find(stage, "RUN"))
    assert re.search(rf"useradd --uid {user} --gid {user} .* pagedserve\b", created), created


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_health_check_runs_handler_health_check_ready(dockerfile: Path) -> None:
    checks = find(final_stage(dockerfile), "HEALTHCHECK")
    assert len(checks) == 1
    flags, command = split_flags(checks[0].args)
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    assert command[0] == "CMD"
    assert json.loads(checks[0].args.partition("CMD")[2]) == ["python", "-m", "handler.health_check", "--ready"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_no_secret_is_baked_in(dockerfile: Path) -> None:
    for stage in stages(dockerfile):
        for instruction in find(stage, "ENV") + find(stage, "ARG"):
            for name, default in env_pairs(instruction):
                assert not (SECRET_NAME.search(name) and default.strip("\"'")), f"line {instruction.line}: {name}"
        for copy in find(stage, "COPY") + find(stage, "ADD"):
            _, words = split_flags(copy.args)
            assert not any(SECRET_FILE.search(source) for source in words[:-1]), f"line {copy.line}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_final_stage_has_no_build_tools_and_no_apt_lists(dockerfile: Path) -> None:
    for run in find(final_stage(dockerfile), "RUN"):
        installed = apt_packages(run.args)
        assert installed & BUILD_TOOLS <= ALLOWED_BUILD_TOOLS[dockerfile.name], f"line {run.line}: {installed}"
        if installed:
            assert "rm -rf /var/lib/apt/lists/*" in run.args, f"line {run.line}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_entrypoint_is_tini_then_the_repos_entrypoint_script(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    entrypoint = json.loads(find(stage, "ENTRYPOINT")[-1].args)
    assert entrypoint[:2] == ["tini", "--"] and len(entrypoint) == 3
    script = Path(entrypoint[2]).relative_to(APP_DIR)
    assert (REPO / script).is_file()
    assert find(stage, "WORKDIR")[-1].args == APP_DIR
    assert find(stage, "STOPSIGNAL")[-1].args == "SIGTERM"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_copy_sources_are_in_the_repo_and_in_the_build_context(dockerfile: Path) -> None:
    for stage in stages(dockerfile):
        for copy in find(stage, "COPY"):
            flags, words = split_flags(copy.args)
            if "from" in flags:
                continue
            for source in words[:-1]:
                assert (REPO / source).exists(), f"line {copy.line}: {source}"
                assert not ignored(source.strip("/")), f"line {copy.line}: .dockerignore excludes {source}"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_context() -> None:
    for path in (".git/config", ".venv/bin/python", "tests/conftest.py", "engine/__pycache__/config.cpython-311.pyc",
                 "pagedserve.egg-info/PKG-INFO", "handler/key_file.json", ".env", "docker/models/llama/model.safetensors"):
        assert ignored(path), path
    for path in ("engine/config.py", "handler/launcher.py", "model-config/smollm2-135m-cpu.yaml", "docker/entrypoint.sh"):
        assert not ignored(path), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_exposed_ports_are_the_launchers_inference_and_metrics_ports(dockerfile: Path) -> None:
    exposed = {int(port) for expose in find(final_stage(dockerfile), "EXPOSE") for port in expose.args.split()}
    assert exposed == {launcher_default("inference_port"), launcher_default("metrics_port")}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_volumes_are_the_models_and_keys_folders_and_the_health_check_finds_the_keys(dockerfile: Path) -> None:
    stage = final_stage(dockerfile)
    volumes = [json.loads(volume.args) for volume in find(stage, "VOLUME")]
    assert volumes == [["/models", KEY_DIR]]
    assert ("PAGEDSERVE_KEY_DIR", KEY_DIR) in [pair for env in find(stage, "ENV") for pair in env_pairs(env)]


def test_the_cpu_build_stops_first_when_torch_index_url_is_missing() -> None:
    builder = stages(DOCKER / "Dockerfile.cpu")[0]
    assert ("TORCH_INDEX_URL", "") in [pair for arg in find(builder, "ARG") for pair in env_pairs(arg)]
    first_run = find(builder, "RUN")[0]
    assert '-z "$TORCH_INDEX_URL"' in first_run.args and "exit 1" in first_run.args

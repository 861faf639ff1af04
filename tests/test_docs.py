"""The documentation cannot go stale unseen: the CLI reference is what the commands say, every link
between pages lands on a file and a heading that exist, and the README's index names every command."""

import importlib.util
import re
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _reference_module():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(path: Path) -> str:
    """A page without its code blocks: a `# comment` in a bash block is no heading."""
    return FENCE.sub("", path.read_text())


def anchors(path: Path) -> set[str]:
    """Heading anchors as GitHub makes them: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", _prose(path), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: not ours to check offline
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    return broken


def test_the_cli_reference_is_what_the_commands_say():
    expected = _reference_module().render()
    assert (ROOT / "docs" / "cli.md").read_text() == expected, \
        "docs/cli.md is stale: run `python docs/cli_reference.py > docs/cli.md`"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no heading](page.md#nowhere)\n")
    assert broken_links(page) == ["missing.md (no such file)", "page.md#nowhere (no such heading)"]


def test_the_readme_lists_every_command():
    table = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `ticknorm")]
    leaves = [ctx.command_path for command, ctx in _reference_module().commands() if not isinstance(command, click.Group)]
    missing = [path for path in leaves if not any(line.startswith((f"| `{path} ", f"| `{path}`")) for line in table)]
    assert missing == []

"""Writes docs/cli.md from the click commands themselves, so the reference says what `--help` says
and cannot drift from it (tests/test_docs.py compares the file with this script's output).

    python docs/cli_reference.py > docs/cli.md    (with ticknorm installed, or PYTHONPATH=.)

It lives beside the pages, not in the package: it reads `ticknorm.cli` (the top floor) and nothing
in ticknorm needs it.
"""

import inspect

import click

from ticknorm.cli import main

HEADER = """# Command-line reference

Generated from the click commands by `python docs/cli_reference.py > docs/cli.md`; do not edit by
hand (`tests/test_docs.py` fails when this page and the commands disagree). `--help` on any
command prints the same. The [README](../README.md) lists the commands; the other pages in
this folder explain what they do.
"""


def commands(group: click.Group = main, parent: click.Context | None = None):
    """Every command under `group` with its context, depth first in click's own order."""
    ctx = click.Context(group, info_name="ticknorm" if parent is None else group.name, parent=parent)
    yield group, ctx
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            yield from commands(command, ctx)
        else:
            yield command, click.Context(command, info_name=name, parent=ctx)


def _markdown(text: str) -> str:
    """Help texts are plain text: a `*` in a glob must not start emphasis."""
    return text.replace("*", r"\*")


def section(command: click.Command, ctx: click.Context) -> str:
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    lines = [f"## `{ctx.command_path}`", "", "```", usage, "```", "", _markdown(inspect.cleandoc(command.help or "")), ""]
    # Arguments are in the usage line; like `--help`, the list is of options (less `--help` itself).
    help_option = command.get_help_option(ctx)
    options = [param for param in command.get_params(ctx)
               if isinstance(param, click.Option) and param.name != getattr(help_option, "name", None)]
    records = [option.get_help_record(ctx) for option in options]
    for names, help_text in filter(None, records):
        lines.append(f"- `{names}`" + (f": {_markdown(help_text)}" if help_text else ""))
    return "\n".join(lines).rstrip() + "\n"


def render() -> str:
    return "\n".join([HEADER, *(section(command, ctx) for command, ctx in commands())])


if __name__ == "__main__":
    print(render(), end="")

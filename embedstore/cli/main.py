"""The `embedstore` command (Typer): the app, its commands from one module per group, and the one
place where errors become what a command line shows (one line and exit code 2 for a wrong request,
1 for a damaged store, 130 when interrupted).

Library imports happen inside the commands so `embedstore --help` is quick and decode worker
processes (which re-import the entry module) stay light.
"""

from __future__ import annotations

import sys

import click
import typer
from typer.core import TyperArgument

from embedstore.cli import bench, demo, evaluate, finetune, ingest, manage, search, serve, sql
from embedstore.cli.render import fail
from embedstore.errors import SourceUnavailableError, StoreDamagedError, UsageError
from embedstore.version import __version__

try:  # typer >= 0.2x bundles its own click, whose exceptions are not the click package's
    from typer._click import exceptions as typer_click_exceptions
except ImportError:
    typer_click_exceptions = click.exceptions
NO_ARGS_ERRORS = (click.exceptions.NoArgsIsHelpError, typer_click_exceptions.NoArgsIsHelpError)
CLICK_USAGE_ERRORS = (click.UsageError, typer_click_exceptions.UsageError)
ABORTS = (KeyboardInterrupt, click.exceptions.Abort, typer.Abort)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="DINOv2 embeddings for radiology archives. Short options: -h for help, -k for "
                       "neighbour counts, -o for a file a command writes (its --json PATH).")


def argument_usage(argument: TyperArgument) -> str:
    return argument.display_name_raw if argument.required else f"[{argument.display_name_raw}]"


# Typer writes a required argument as `{name}` beside its Python type (`{sources}...`,
# `sources... <list[str]>`): show the argument's metavar alone, as click does.
TyperArgument._usage_display_name = argument_usage
TyperArgument.display_type_rich = lambda argument, ctx: None


def print_version(value: bool) -> None:
    if value:
        print(f"embedstore {__version__}")
        raise typer.Exit()


@app.callback()
def shared_options(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                                help="Print the version and exit.")) -> None:
    pass  # the options of `embedstore` itself, before any command


# In the order `embedstore --help` lists them.
COMMANDS = (ingest.ingest, ingest.catalog, manage.info, manage.models, manage.failures, search.search, search.index,
            search.export, sql.sql, finetune.finetune, bench.bench, bench.report, manage.vacuum, manage.check,
            manage.migrate, serve.serve, demo.demo)
for command in COMMANDS:
    app.command()(command)
app.add_typer(evaluate.eval_app, name="eval")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except NO_ARGS_ERRORS as error:
        print(error.ctx.get_help(), file=sys.stderr)
        sys.exit(2)
    except CLICK_USAGE_ERRORS as error:
        fail(error.format_message())
    except UsageError as error:
        fail(str(error))
    except SourceUnavailableError as error:
        fail(str(error), code=1)
    except (StoreDamagedError, RuntimeError, ValueError) as error:  # Lance's errors on a damaged file
        from embedstore.store import as_damage  # a store file that cannot be read: one line, exit code 1

        damage = error if isinstance(error, StoreDamagedError) else as_damage(error)
        if damage is None:
            raise
        fail(str(damage), code=1)
    except ABORTS:
        print("embedstore: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

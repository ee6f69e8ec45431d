"""What the Ray job commands (``jobs/*.py``, also ``crossmodal collect|reduce|steer|run``) share.

Their options, the environment Ray must see before it is imported, and the one-line error
exit. Click builds a fresh parameter each time one of these decorators is applied, so one
decorator object serves every command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
CONTEXT = {"help_option_names": ["-h", "--help"]}

config_argument = click.argument("config", type=click.Path(exists=True, dir_okay=False))
store_argument = click.argument("store", type=click.Path(exists=True, file_okay=False))
address_option = click.option(
    "--address",
    default=None,
    help="Ray address: 'auto' joins a running head; default: the submitting cluster under "
    "`ray job submit`, else an in-process Ray.",
)


def set_ray_env() -> None:
    """Ray's settings for these jobs (no auth, no usage stats) unless the caller set them.

    Call it at import time of a job module: Ray reads them when it is imported (platform.md).
    """
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)


def no_progress_option(what: str = "bar") -> Callable[[F], F]:
    """``--no-progress``; ``what`` names the progress display (``bar`` or ``bars``)."""
    return click.option("--no-progress", is_flag=True, help=f"No progress {what} (logs, CI).")


@contextmanager
def exit_on_error(kind: type[Exception] = ValueError) -> Iterator[None]:
    """Turn a ``kind`` error (config, store, data, model) into one ``error: ...`` line on
    stderr and exit status 2, instead of a traceback."""
    try:
        yield
    except kind as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)

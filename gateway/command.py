"""A ``gateway`` subcommand contributed by a plugin (the ``register_commands`` hook)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One ``gateway NAME ...`` subcommand.

    Attributes:
        name: the word after ``gateway``; must not be a core command or another plugin's.
        help: one line for ``gateway --help``.
        run: called with the parsed ``argparse.Namespace``; returns the exit status (None: 0).
            Raising ``ConfigError`` or ``PluginError`` prints ``gateway: <message>`` and exits 2.
        arguments: called with the subcommand's ``ArgumentParser`` to declare its arguments
            (and sub-subcommands); None when it takes none.
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int | None]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None

"""``gateway firestore indexes``: the Firestore sink's indexes as ``firestore.indexes.json``.

    gateway firestore indexes [--config gateway.toml] > firestore.indexes.json
    firebase deploy --only firestore:indexes      # or: gcloud firestore indexes composite create

The collection names carry ``[sinks.firestore].collection_prefix`` from the config (or
``--prefix``). Added to the ``gateway`` CLI through the ``register_commands`` hook; also runnable
as ``python -m sinks.firestore.cli indexes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from typing import Any

from gateway.command import Command

INDEXES = resources.files("sinks.firestore").joinpath("indexes.json")  # package data


def indexes(prefix: str = "") -> dict[str, Any]:
    """The index definitions, with ``prefix`` prepended to every collection group."""
    spec = json.loads(INDEXES.read_text(encoding="utf-8"))
    for entry in spec["indexes"] + spec.get("fieldOverrides", []):
        entry["collectionGroup"] = prefix + entry["collectionGroup"]
    return spec


def print_indexes(args: argparse.Namespace) -> int:
    """Print ``firestore.indexes.json`` for the configured collection prefix."""
    prefix = args.prefix
    if prefix is None and args.config:
        from gateway import config as gwconfig

        table = gwconfig.load(args.config).sinks.get("firestore") or {}
        prefix = table.get("collection_prefix", "")
    json.dump(indexes(prefix or ""), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def arguments(parser: argparse.ArgumentParser) -> None:
    """``firestore`` takes one action, ``indexes``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("indexes", help="print firestore.indexes.json for the sink's queries")
    p.add_argument("--config", metavar="PATH", help="TOML file (for collection_prefix)")
    p.add_argument("--prefix", help="collection prefix (overrides the config's)")
    p.set_defaults(run=print_indexes)


COMMAND = Command("firestore", "Firestore sink tools (indexes)", print_indexes, arguments)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sinks.firestore.cli")
    arguments(parser)
    return print_indexes(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

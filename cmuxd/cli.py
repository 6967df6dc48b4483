"""Command line: parse with argh, then call the parts that do the work."""

from __future__ import annotations

import asyncio
import logging
import sys

import argh

from . import __version__
from .connection import serve_stdio


def version() -> None:
    """Print the version and exit."""
    print(__version__)


@argh.arg("--stdio", help="serve one connection on stdin/stdout (what `ssh host cmuxd-remote serve --stdio` runs)")
def serve(stdio: bool = False) -> None:
    """Serve the cmux remote protocol."""
    if not stdio:
        raise argh.CommandError("choose a transport: --stdio")
    sys.exit(asyncio.run(serve_stdio()))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="cmuxd: %(message)s", stream=sys.stderr)
    parser = argh.ArghParser(prog="cmuxd-remote", description=__doc__)
    parser.add_commands([version, serve])
    parser.dispatch()


if __name__ == "__main__":
    main()

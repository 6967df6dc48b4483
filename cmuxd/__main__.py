"""`cmuxd-remote` and `python -m cmuxd`. A plain `serve --stdio` goes to the front door
before the command line's machinery (argh, asyncio, orjson) is imported: an SSH connection
to a host with a running daemon then costs little more than the interpreter's start."""

import sys


def main() -> None:
    from .front import quick_join

    quick_join(sys.argv[1:])
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()

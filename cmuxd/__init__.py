"""cmuxd: the cmux remote daemon, served over stdio, TCP and Unix sockets."""

__version__ = "0.1.0"

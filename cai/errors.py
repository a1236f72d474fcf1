"""`CaiError`: the base of every error caused by input, settings or an engine unable to do what was
asked. The CLI turns one into a single line and exit code 2; any other exception is a bug in cai or
a library and keeps its traceback."""

from __future__ import annotations


class CaiError(Exception):
    """A user error: the message names the file, line or field and what to do."""

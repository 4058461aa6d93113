"""Errors meant for people: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class LargeForgeError(Exception):
    """A problem with the user's input (a file, a recipe, a flag), not a bug in LargeForge.

    The message must say what is wrong, where (file, line or key) and what was expected.
    """

    exit_code = 2

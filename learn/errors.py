"""The one exception learn/ raises for input it cannot use.

A bad file, a malformed ranking or an unreachable service is the user's to fix, not a bug: the
CLI (``serve.cli``) prints a ``LearnError`` as one line and exits 2, never with a traceback.
It is a ``ValueError`` so that the stages' own argument checks (``ValueError`` from a config's
``__post_init__``) and data errors are caught by one clause.
"""

from __future__ import annotations


class LearnError(ValueError):
    """Input a learning command cannot use; the message names the file, field or URL."""

"""One base for the user's mistakes: the CLI prints any of them as one line and exits 2.

Each module raises the subclass that says where the mistake is; code that only needs to know
"this is the user's to fix" catches ``UserError``.
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix; the message is one line meant for them."""


class RecipeError(UserError, ValueError):
    """A recipe or override that cannot be used."""


class DataError(UserError, ValueError):
    """Data that cannot be used."""


class BackendError(UserError, RuntimeError):
    """A backend, device or model that cannot be used as asked."""


class RunDirError(UserError):
    """A run directory that is not what the command needs (missing, unfinished, foreign, locked)."""


class CompareError(UserError):
    """``dualtune compare``: one of the two runs failed (its log says why); the command exits 1."""

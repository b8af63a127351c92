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


class DivergedError(UserError, FloatingPointError):
    """Training whose loss stopped being a finite number (the NaN guard): the recipe's to change."""


class CompareError(UserError):
    """``dualtune compare``: one of the two runs failed (the line gives its last line and its log);
    the command exits 1."""


class SweepError(UserError):
    """A sweep that cannot run as asked (storage, sweep directory, optuna missing, a worker failed)."""


class TrackerError(UserError):
    """An experiment tracker that cannot be reached or used (probed before training, or failing
    mid-run with ``train.report_to_strict``)."""


class ExportError(UserError):
    """``dualtune export``: a run that cannot be exported as asked, or an export whose artefact did
    not reproduce the run's predictions (nothing is left behind)."""

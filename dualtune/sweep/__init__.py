"""``dualtune sweep``: hyperparameter search over a recipe with Optuna.

A space file (YAML) names the metric, its direction and a distribution for each recipe key it
searches::

    metric: f1_macro
    direction: maximize
    params:
      peft.lora.r: {choices: [4, 8, 16, 32]}            # categorical
      peft.lora.dropout: {type: float, low: 0.0, high: 0.1}
      optim.lr: {type: float, low: 1.0e-5, high: 2.0e-4, log: true}
      train.batch_size: {type: int, low: 8, high: 32, step: 8}
    pruner: {n_startup_trials: 5, n_warmup_steps: 0}    # median pruner (Optuna's defaults); or: none

Each trial is a ``dualtune run`` in a process of its own, into ``SWEEP/trial-NNN``; its evaluations
reach Optuna's median pruner as the run writes them. The study lives in an Optuna storage (SQLite in
the sweep directory by default) under the recipe's name, so the same command continues an
interrupted sweep: trials that finished count toward ``--trials``, and a trial whose sweep process
died is run again under its own number and parameters (from its checkpoint where it has one).
``--jobs J`` runs J worker processes that share the storage; a lock in the sweep directory makes
"count, then ask for a trial" one step, so no trial is lost or run twice.

The rooms: ``space`` (the space file's schema and checks), ``study`` (the sweep, its Optuna study
and storage, which trial runs next), ``workers`` (trial and worker processes, signals, the command's
flow), ``outputs`` (tables, best_recipe.yaml, plots, summary). This package imports no framework:
the trials do.
"""

from __future__ import annotations

from dualtune.errors import SweepError
from dualtune.sweep.outputs import best_recipe, summarize
from dualtune.sweep.space import Param, Space, load_space, override
from dualtune.sweep.study import Sweep, make_sweep, open_study
from dualtune.sweep.workers import sweep, work

__all__ = [
    "Param",
    "Space",
    "Sweep",
    "SweepError",
    "best_recipe",
    "load_space",
    "make_sweep",
    "open_study",
    "override",
    "summarize",
    "sweep",
    "work",
]

"""train.report_to on MindSpore: one run in this process (MindSpore active, so `import torch` is
mindtorch) logs to TensorBoard, MLflow and W&B, each tracker's reader gives back metrics.jsonl, and
no real torch module was loaded on the way (tensorboardX, not torch.utils.tensorboard)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from test_tracking import ALL, check_all_trackers, overrides

from helpers import RECIPES

TRACKER_ENV = ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT")

REAL_TORCH_CHECK = """
import importlib.machinery, sys
from pathlib import Path
# sys.path's torch package, past mindnlp's import hook (which also answers importlib.metadata for torch)
real = Path(importlib.machinery.PathFinder.find_spec("torch").origin).resolve().parent
loaded = [name for name, mod in list(sys.modules.items()) if (name == "torch" or name.startswith("torch."))
          and getattr(mod, "__file__", None) and Path(mod.__file__).resolve().is_relative_to(real)]
loaded += ["torch._C"] * ("torch._C" in sys.modules)
"""


def real_torch_modules() -> list[str]:
    """Modules of the real torch package in this process (mindtorch registers its own as torch.*)."""
    scope: dict = {}
    exec(REAL_TORCH_CHECK, scope)
    return scope["loaded"]


def test_all_trackers_on_mindspore(ms, tiny_bert, fin_data, tmp_path, monkeypatch):
    from dualtune.recipe import load_recipe
    from dualtune.runner import run_recipe

    for key in TRACKER_ENV:
        monkeypatch.delenv(key, raising=False)
    assert "mindtorch" in sys.modules["torch"].__file__ and not real_torch_modules()
    recipe = load_recipe(RECIPES / "minilm_demo.yaml", [*overrides(tiny_bert, fin_data), ALL])
    out = run_recipe(recipe, ms, tmp_path / "tracked", progress=False)
    check_all_trackers(Path(out), "mindspore")
    assert (Path(out) / "loss_curve.png").is_file()
    import torch

    assert "mindtorch" in torch.__file__
    assert real_torch_modules() == [], "a tracker (or its reader) loaded real torch beside MindSpore"


def test_trackers_import_no_real_torch_in_a_fresh_mindspore_process():
    """mindspore and mindnlp first (as the backend imports it), then each tracker library and what
    dualtune uses of it."""
    code = (
        "import mindspore\n"
        "from dualtune.backends.mindspore import import_mindnlp\n"
        "import_mindnlp()\n"
        "import tensorboardX, mlflow, wandb\n"
        "from tensorboardX import SummaryWriter\n"
        "from mlflow.tracking import MlflowClient\n"
        "from mlflow.entities import Metric, Param\n"
        "import dualtune.tracking\n"
        "import torch\n" + REAL_TORCH_CHECK + "print(torch.__file__)\nprint(loaded)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch_file, loaded = proc.stdout.strip().splitlines()[-2:]
    assert "mindtorch" in torch_file and loaded == "[]", proc.stdout
    assert importlib.metadata.version("tensorboardX")

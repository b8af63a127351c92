"""dualtune: one YAML recipe, parameter-efficient fine-tuning on PyTorch or MindSpore.

The core (this package) imports no framework; ``dualtune.backend.get_backend(name)`` activates one.

    from dualtune.backend import get_backend
    from dualtune.recipe import load_recipe
    from dualtune.runner import run_recipe

    recipe = load_recipe("recipes/t5_lora.yaml", ["optim.lr=3e-4"])
    run_recipe(recipe, get_backend("torch"))  # -> runs/t5_lora-torch
"""

__version__ = "0.2.0"  # the one place; pyproject.toml reads it

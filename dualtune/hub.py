"""Where models come from: a hub id, a local directory, or a directory shipped inside a Python
package (``pkg:NAME/sub/dir``), which is how the offline demo finds its pretrained MiniLM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dualtune.backend import BackendError


def resolve_model_path(name_or_path: str) -> str:
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    package, _, rest = name_or_path[len("pkg:") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            f"model {name_or_path!r}: Python package {package!r} is not installed "
            f"(pip install {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    if not path.exists():
        raise BackendError(f"model {name_or_path!r}: {path} does not exist")
    return str(path)


def model_not_found(name_or_path: str, err: Exception) -> BackendError:
    if Path(name_or_path).exists():
        return BackendError(f"model {name_or_path!r}: cannot load ({str(err).splitlines()[0]})")
    return BackendError(
        f"model {name_or_path!r}: not a local directory and the hub could not be reached; download it "
        f"where there is network (huggingface-cli download {name_or_path} --local-dir DIR) and set "
        f"model.name_or_path=DIR"
    )

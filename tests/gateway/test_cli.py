from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def lockgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


def test_serve_refuses_an_invalid_config_and_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("models:\n  - name: m\n    max_sequences: -1\n")
    result = lockgate("serve", "--config", str(config))
    assert result.returncode == 2
    assert "models.0.max_sequences" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_missing_model_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"models:\n  - name: m\n    path: {tmp_path / 'absent.gguf'}\n")
    result = lockgate("serve", "--config", str(config))
    assert result.returncode == 2
    assert "model file not found" in result.stderr


def test_fetch_model_prints_the_assembled_path() -> None:
    result = lockgate("fetch-model")
    assert result.returncode == 0, result.stderr
    assert "gemma-3-270m-q4_k_m.gguf" in result.stderr


def test_openapi_prints_every_front_door(tmp_path: Path) -> None:
    import json

    config = tmp_path / "c.yaml"
    config.write_text("models:\n  - name: echo\n    backend: fake\n")
    result = lockgate("openapi", "--config", str(config))
    assert result.returncode == 0, result.stderr
    paths = json.loads(result.stdout)["paths"]
    assert {"/v1/chat/completions", "/v1/responses", "/api/chat", "/admin/tenants"} <= set(paths)

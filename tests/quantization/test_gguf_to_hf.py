"""The GGUF -> Hugging Face conversion for vLLM, checked against llama.cpp.

The conversion and the transformers side of the check run in the vLLM virtualenv
(``~/.cache/lockgate/vllm-venv``, or ``$LOCKGATE_VLLM_VENV``), which has torch and
transformers; llama.cpp's side runs in this interpreter (llama-cpp-python). Without that
virtualenv the real-model test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.model_store import default_cache_dir, default_model_path
from quantization.gguf_to_hf import build_merges, hf_tensor_name

PROJECT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("LOCKGATE_VLLM_VENV", default_cache_dir() / "vllm-venv"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
CONVERTED = default_cache_dir() / "vllm-models" / "gemma-3-270m"


def test_tensor_names_map_to_gemma3() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.17.ffn_norm.weight") == (
        "model.layers.17.pre_feedforward_layernorm.weight"
    )
    assert hf_tensor_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    with pytest.raises(ValueError, match="unexpected"):
        hf_tensor_name("blk.0.ssm_conv.weight")


def test_merges_follow_piece_scores() -> None:
    # Pieces and scores as in a SentencePiece BPE vocabulary; control pieces never merge.
    tokens = ["<bos>", "a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, -10.0, -11.0, -12.0, -2.0, -1.0, -3.0]
    types = [3, 1, 1, 1, 1, 1, 1]
    assert build_merges(tokens, scores, types) == [
        ("b", "c"),  # "bc" scores best
        ("a", "b"),
        ("a", "bc"),  # both splits of "abc", at its score
        ("ab", "c"),
    ]


@pytest.mark.integration
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not VLLM_PYTHON.is_file(),
    reason=f"the vLLM virtualenv ({VLLM_VENV}) does not exist; create it with "
    "`quantization/vllm.sh setup`",
)
def test_converted_model_agrees_with_llama_cpp() -> None:
    gguf = default_model_path(progress=False)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    convert = [str(VLLM_PYTHON), "-m", "quantization.gguf_to_hf", "--gguf", str(gguf)]
    first = subprocess.run(
        [*convert, "--out", str(CONVERTED)], cwd=PROJECT, env=env, capture_output=True, text=True
    )
    assert first.returncode == 0, first.stderr
    assert (CONVERTED / "lockgate-conversion.json").is_file()

    # Idempotent: a second run recognises the conversion by the GGUF's hash and skips it.
    started = time.monotonic()
    again = subprocess.run(
        [*convert, "--out", str(CONVERTED)], cwd=PROJECT, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert "skipping" in again.stderr
    assert time.monotonic() - started < 30

    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantization.compare_logits",
            "--gguf",
            str(gguf),
            "--hf",
            str(CONVERTED),
            "--llama-python",
            sys.executable,
            "--hf-python",
            str(VLLM_PYTHON),
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
    )
    print(check.stdout)
    assert check.returncode == 0, check.stdout + check.stderr[-4000:]
    assert "tokenization: 21/21" in check.stdout
    assert check.stdout.rstrip().endswith("AGREE")

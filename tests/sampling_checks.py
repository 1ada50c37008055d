"""Checks the sampling backend tests share (imported by test_sampling_cpp, test_hybrid_cpp and the two
Triton test files; pytest puts this folder on sys.path)."""

import json
import os
import subprocess
import sys

import pytest
import torch


def assert_same_draw(ours, expected):
    """Two (tokens int64, winning scores float64) pairs are the same draw: tokens equal and the scores
    bit for bit, NaN (any payload) where the expected one has NaN."""
    (tokens, best), (tokens_ref, best_ref) = ((t.cpu() for t in pair) for pair in (ours, expected))
    assert tokens.dtype == torch.int64 and best.dtype == torch.float64
    assert torch.equal(tokens, tokens_ref)
    nan = best_ref.isnan()
    assert torch.equal(best.isnan(), nan)
    assert torch.equal(best[~nan].view(torch.int64), best_ref[~nan].view(torch.int64))


def compiled_ptx_ops(script: str, tmp_path) -> dict:
    """Runs ``script`` (which compiles Triton kernels for sm_90 without a GPU and prints one JSON line of
    what their PTX holds) outside the interpreter, in a fresh Triton cache; skips when this triton has no
    NVIDIA backend. Returns the parsed JSON."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])

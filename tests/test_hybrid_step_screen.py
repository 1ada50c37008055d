"""hybrid_step's C++ backend with either instruction set of the CPU sampling stages (the Philox words of its
race in AVX2 lanes, or the portable tile) returns the reference's tokens and winning scores bit for bit, on
rows that stress the race: V = 50258, MASK and real rows, log-scores up to ±1e4 and -inf, final rows,
Euler and analytic steps (docs/hybrid-step.md; docs/sampling-screen.md, "The γ step")."""

import math

import pytest
import torch

from hdlm_kernels import _extension
from hdlm_kernels.sampling.hybrid import _hybrid_step_reference, step_coefficients
from tests.sampling_checks import assert_same_draw, cpu_isas

pytestmark = pytest.mark.skipif(bool(_extension.missing_reason), reason="needs the compiled extension")

VOCAB = 50258
MASK_ID = VOCAB - 1
SEED, STEP = 77, 5


def C():
    return _extension._C




def rows(dtype):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(6, VOCAB, generator=g, dtype=torch.float64) * 3 - 8
    s[1] *= 3000  # ±1e4
    s[2, : VOCAB // 2] = -math.inf
    s[3] = -math.inf
    s[3, 123] = 0.5
    s[4] = 0.0  # every ratio 1: the noise decides among equal weights
    s[5] = s[0] + 40  # above the current token by far
    x = torch.tensor([MASK_ID, 5, MASK_ID, 17, 0, MASK_ID])
    return s.to(dtype), x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, gamma", [("analytic", 0.01), ("analytic", 0.7), ("euler", 0.3)])
def test_cpp_matches_the_reference_with_every_isa(dtype, method, gamma):
    log_score, x = rows(dtype)
    now = torch.full((6,), 2.0, dtype=torch.float64)
    nxt = torch.tensor([1.9, 1.9, 0.0, 1.5, 1.99, 1.0], dtype=torch.float64)
    final = nxt == 0
    coefficients = step_coefficients(x, now, nxt, gamma, MASK_ID, VOCAB, method, final)
    row_ids = torch.tensor([0, 3, 10**9, 7, 8, 2**33 + 1])
    expected = _hybrid_step_reference(log_score, x, coefficients, row_ids, MASK_ID, SEED, STEP, 2)
    for isa in cpu_isas():
        C().set_cpu_isa(isa)
        try:
            ours = C().hybrid_step_cpu(log_score, x, coefficients, row_ids, MASK_ID, SEED, STEP)
        finally:
            C().set_cpu_isa("auto")
        assert_same_draw(ours, expected)

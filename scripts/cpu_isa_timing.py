"""Times the C++ samplers per CPU instruction set (docs/sampling-screen.md, "Measured (CPU)"): the
benchmark's problem (logits [256, 50258] fp32, normal × 3; the γ step analytic, γ = 0.01, half the rows
MASK, log-scores = logits - 10), ``gumbel_argmax`` and ``hybrid_step`` on the "cpp" backend with each
instruction set the extension can use ("avx512", "avx2", "scalar"), in alternating passes so that a
drift of the machine's speed shows in every set alike. Prints the median time per call and the ratio
hybrid_step / gumbel_argmax per pass.

Usage: python scripts/cpu_isa_timing.py [--calls 15] [--passes 3] [--threads 2] [--isa avx512,avx2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import hdlm_kernels as hk
from hdlm_kernels import _extension

ROWS, VOCAB = 256, 50258
MASK_ID = VOCAB - 1


def median_seconds(call, calls: int) -> float:
    call()  # warm-up: first-touch of the buffers, thread pool
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", default="avx512,avx2", help="comma-separated: avx512, avx2, scalar")
    args = parser.parse_args(argv)
    if _extension._C is None:
        raise SystemExit(f"cpu_isa_timing: the C++ extension is not built: {_extension.missing_reason}")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(ROWS, VOCAB, generator=g) * 3
    x = torch.randint(0, MASK_ID, (ROWS,), generator=g)
    x[torch.randperm(ROWS, generator=g)[:ROWS // 2]] = MASK_ID
    log_score = logits - 10.0

    def gumbel():
        hk.sampling.gumbel_argmax(logits, 1, 2, backend="cpp")

    def hybrid():
        hk.sampling.hybrid_step(x, log_score, 2.0, 1.95, 0.01, MASK_ID, 1, 2, backend="cpp")

    print("| pass | isa | gumbel_argmax (ms) | hybrid_step (ms) | ratio |\n|---|---|---|---|---|")
    try:
        for index in range(args.passes):
            for isa in args.isa.split(","):
                _extension._C.set_cpu_isa(isa)  # raises, naming the set, where the processor lacks it
                a, b = median_seconds(gumbel, args.calls), median_seconds(hybrid, args.calls)
                print(f"| {index} | {isa} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f} |", flush=True)
    finally:
        _extension._C.set_cpu_isa("auto")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

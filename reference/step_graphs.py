"""Per-step forward passes of the generation loop captured as CUDA graphs and replayed (issue: launch
overhead). A KV-cached window step of a small model launches a few hundred kernels of a few µs each;
replaying a captured graph launches them as one (docs/benchmarks.md).

A graph freezes its shapes, the addresses it reads and writes, and every host-side constant of the
captured calls (Python ints, the attention mask of the call, the cell positions). So a captured step
can be replayed for another step only when those agree; the generation plan gives each step a key that
says so (``hdlm_reference.generate``: fed cells, number of logit rows and the mask's values), counts the
uses of each key in advance, and steps whose key occurs once run eagerly. The tensors that change from
step to step (token ids, σ̄ conditioning, which rows get logits) are copied into the graph's static
inputs before each replay; the KV cache and its length tensor keep their addresses for the whole run.

The first use of a key runs eagerly, which also warms up everything a capture must not do (Triton
compilation, the tile maps of the mask, constants moved to the device), and is captured right after.
A graph is released after its key's last use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable

import torch

__all__ = ["StepGraphs", "capture_cuda_graph", "capture_by_rerunning"]

Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def capture_cuda_graph(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Captures ``run()`` (CUDA work only, no host synchronization) into a CUDA graph; returns its
    replay function and the output tensor that every replay overwrites."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = run()
    return graph.replay, output


def capture_by_rerunning(run: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """The twin of :func:`capture_cuda_graph` without CUDA, for tests of the bookkeeping: "replay"
    runs ``run()`` again and writes into the first output, so stale or forgotten static inputs show up
    as wrong tokens exactly as they would with a real graph."""
    output = run()

    def replay() -> None:
        output.copy_(run())

    return replay, output


class StepGraphs:
    """Runs each step's forward pass, replaying a captured graph where the step's key was seen before
    and will be seen again.

    Args:
        uses: how many times each key will be passed to :meth:`__call__` (from the plan).
        capture: :func:`capture_cuda_graph` (default) or :func:`capture_by_rerunning`.
    """

    def __init__(self, uses: Counter, capture: Capture = capture_cuda_graph):
        self.remaining = Counter(uses)
        self.capture = capture
        self.graphs: dict[Hashable, tuple[Callable[[], None], dict, torch.Tensor]] = {}
        self.replays = 0

    def __call__(self, key: Hashable, forward: Callable[[dict], torch.Tensor],
                 inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``forward(inputs)``, or the replay of the graph of its key with these inputs. ``forward`` may
        read only ``inputs``, host constants that the key fixes, and tensors whose addresses stay
        fixed (weights, the KV cache); steps with one key must have interchangeable ``forward``s."""
        if self.remaining[key] <= 0:
            raise RuntimeError(f"StepGraphs: key {key!r} used more often than the plan said")
        self.remaining[key] -= 1
        entry = self.graphs.get(key)
        if entry is None:
            output = forward(inputs)  # the step itself, and the warm-up of its capture
            if self.remaining[key] > 0:
                static = {name: value.clone() for name, value in inputs.items()}
                replay, static_output = self.capture(lambda: forward(static))
                self.graphs[key] = (replay, static, static_output)
            return output
        replay, static, static_output = entry
        for name, value in inputs.items():
            static[name].copy_(value)
        replay()
        self.replays += 1
        if self.remaining[key] == 0:
            del self.graphs[key]  # frees its memory pool once the output has been consumed
        return static_output

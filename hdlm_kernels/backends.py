"""One registry of every op's implementations, and one rule for choosing among them.

Each op (``attention``, ``decode``, ``gumbel_argmax``, ``acs``, ``hybrid_step``, ``uniform53``,
``corrupt``, ``log64``, ``exp64``) registers its implementations here when its module is imported:
a name (``"reference"``, ``"cpp"``, ``"cuda"``, ``"triton"``, ``"flex"``), whether it is one of the
package's fused kernels, the device kinds on which ``"auto"`` may choose it, an availability probe
that says why it cannot run on a device kind, and a loader that imports it on first use (so that
importing the package imports neither triton nor the compiled extension's kernels).

The rule, the same for every op and every knob of the harness:

* ``"auto"``: the first registered fused kernel that serves the tensors' device kind and is
  available there; the reference when there is none.
* ``"kernels"``: the same fused kernel, or a RuntimeError saying why each candidate is unavailable
  (never the reference).
* any other name: that implementation, or a RuntimeError with the reason it is unavailable on the
  tensors' device. A name the op does not have is a ValueError naming the op and the names it has.

Nothing ever falls back silently from a named implementation to another one. This module imports
nothing of the package; the op modules import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

__all__ = ["AUTO", "KERNELS", "Implementation", "check_name", "implementations", "names", "ops", "register",
           "select"]

AUTO = "auto"
KERNELS = "kernels"
SELECTORS = (AUTO, KERNELS)
DEVICE_KINDS = ("cpu", "cuda")


def runs_anywhere(device_kind: str) -> str:
    """The probe of implementations written in plain PyTorch: they run on every device."""
    return ""


@dataclasses.dataclass(frozen=True, eq=False)
class Implementation:
    """One implementation of one op.

    ``probe(device_kind)`` returns "" when the implementation runs on tensors of that device kind
    ("cpu", "cuda", ...) here, and otherwise why it does not. ``load()`` returns the callable (it
    may import modules; it is called once, on first use). ``auto_devices`` are the device kinds on
    which ``"auto"`` and ``"kernels"`` choose it (only fused kernels have any): the Triton kernels
    run CPU tensors under the interpreter when asked by name, but ``"auto"`` never picks an
    interpreter."""

    op: str
    name: str
    summary: str
    fused: bool
    auto_devices: tuple[str, ...]
    probe: Callable[[str], str]
    load: Callable[[], Callable]

    def unavailable_reason(self, device: torch.device | str) -> str:
        """"" when this implementation runs on tensors of ``device`` here, else why not."""
        kind = _kind(device)
        if kind == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return self.probe(kind)

    def available(self, device: torch.device | str) -> bool:
        return not self.unavailable_reason(device)

    def function(self) -> Callable:
        """The implementation itself (loaded on first use, then kept)."""
        function = _LOADED.get(id(self))
        if function is None:
            function = _LOADED[id(self)] = self.load()
        return function

    def __call__(self, *args, **kwargs):
        return self.function()(*args, **kwargs)


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_LOADED: dict[int, Callable] = {}


def register(op: str, name: str, *, summary: str, load: Callable[[], Callable],
             probe: Callable[[str], str] = runs_anywhere, fused: bool = False,
             auto_devices: tuple[str, ...] = ()) -> Implementation:
    """Adds ``name`` to ``op``'s implementations (in order of preference for ``"auto"``)."""
    if name in SELECTORS:
        raise ValueError(f"register: {name!r} is a selector, not an implementation name")
    if auto_devices and not fused:
        raise ValueError(f"register: {op}/{name}: only fused kernels may be chosen by 'auto'")
    implementations_of_op = _REGISTRY.setdefault(op, {})
    if name in implementations_of_op:
        raise ValueError(f"register: {op} already has an implementation named {name!r}")
    implementation = Implementation(op, name, summary, fused, tuple(auto_devices), probe, load)
    implementations_of_op[name] = implementation
    return implementation


def ops() -> tuple[str, ...]:
    """The registered ops, in registration order."""
    return tuple(_REGISTRY)


def implementations(op: str) -> tuple[Implementation, ...]:
    """``op``'s implementations, in order of preference."""
    return tuple(_op(op).values())


def names(op: str) -> tuple[str, ...]:
    """Every name ``op`` accepts: the selectors ``"auto"`` and ``"kernels"``, then its implementations."""
    return SELECTORS + tuple(_op(op))


def check_name(op: str, backend, where: str | None = None) -> str:
    """``backend`` when ``op`` has it (a selector or an implementation name, available here or not);
    otherwise a ValueError naming ``where`` (the knob being configured), the op and its names.

    Configuration (a model config, a CLI flag, a sampler argument) calls this, so that a name an op
    does not have is refused where it is set, not at the first call."""
    if isinstance(backend, str) and (backend in SELECTORS or backend in _op(op)):
        return backend
    where = f"{where}: " if where and where != op else ""
    raise ValueError(f"{where}{op} has no backend {backend!r}; its backends are "
                     f"{', '.join(map(repr, names(op)))}")


def select(op: str, backend: str, device: torch.device | str, where: str | None = None) -> Implementation:
    """The implementation of ``op`` that ``backend`` names for tensors on ``device`` (module docstring).

    Raises ValueError for a name ``op`` does not have, RuntimeError when the named implementation (or,
    for ``"kernels"``, every fused one) cannot run on ``device`` here."""
    check_name(op, backend, where)
    kind = _kind(device)
    where = where or op
    if backend in SELECTORS:
        reasons = []
        for implementation in _op(op).values():
            if not implementation.fused or kind not in implementation.auto_devices:
                continue
            reason = implementation.unavailable_reason(kind)
            if not reason:
                return implementation
            reasons.append(f"{implementation.name}: {reason}")
        if backend == KERNELS:
            why = "; ".join(reasons) if reasons else "none is registered for that device"
            raise RuntimeError(f"{where}: backend='kernels' needs a fused {op} kernel for {kind} tensors, and "
                               f"there is none here ({why}); use backend='auto' or 'reference'")
        return _op(op)["reference"]
    implementation = _op(op)[backend]
    reason = implementation.unavailable_reason(kind)
    if reason:
        raise RuntimeError(f"{where}: backend={backend!r} cannot run on {kind} tensors here: {reason}")
    return implementation


def _op(op: str) -> dict[str, Implementation]:
    try:
        return _REGISTRY[op]
    except KeyError:
        raise ValueError(f"no op named {op!r}; the ops are {', '.join(map(repr, _REGISTRY))}") from None


def _kind(device: torch.device | str) -> str:
    return device if isinstance(device, str) and ":" not in device else torch.device(device).type

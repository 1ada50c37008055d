"""A recorder of the operations that make the host wait for the device: a value read on the host
(``item``, ``int()``, ``bool()``, ``tolist``, ``numpy``), an output whose size depends on values
(``nonzero``, boolean indexing, ``unique``, ...), or a copy to the CPU. On the CPU nothing waits, but
the same calls would on a GPU, so tests on a CPU machine find them too.

``tolist`` and ``numpy`` read the data without dispatching an aten op, so they are caught at the
Python level (a TorchFunctionMode); everything else at the dispatcher (a TorchDispatchMode).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncs"]

SYNCING_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
               torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
               torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
               torch.ops.aten.unique_consecutive.default, torch.ops.aten.repeat_interleave.Tensor,
               torch.ops.aten.is_nonzero.default}
BOOL_INDEXED_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                    torch.ops.aten.index_put_.default}
SYNCING_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy}


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, owner: "HostSyncs"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.owner.armed:
            indices = args[1] if func in BOOL_INDEXED_OPS and len(args) > 1 else ()
            if func in SYNCING_OPS or any(i is not None and i.dtype == torch.bool for i in indices):
                self.owner.seen.append(str(func))
            elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                source = args[1] if func is torch.ops.aten.copy_.default else args[0]
                target = (args[0].device if func is torch.ops.aten.copy_.default
                          else (kwargs or {}).get("device", source.device))
                if source.device.type != "cpu" and torch.device(target).type == "cpu":
                    self.owner.seen.append(f"{func} (device to host)")
        return func(*args, **(kwargs or {}))


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, owner: "HostSyncs"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.owner.armed and func in SYNCING_METHODS:
            self.owner.seen.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """``with HostSyncs() as syncs: ...`` records into ``syncs.seen`` every host-waiting operation while
    ``syncs.armed`` (True from the start unless ``armed=False``: a hook can arm it later)."""

    def __init__(self, armed: bool = True):
        self.armed = armed
        self.seen: list[str] = []
        self._modes = (_FunctionRecorder(self), _DispatchRecorder(self))

    def __enter__(self) -> "HostSyncs":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

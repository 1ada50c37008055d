"""Training checkpoints: atomic files, the newest one, the last ``k`` kept, and the random state to resume.

A checkpoint is one ``torch.save`` file ``ckpt_{step:09d}.pt`` holding a dict (the trainer's is
described in :mod:`hdlm_reference.trainer`). Writing is atomic: the data goes to a temporary file in the
same directory (``.tmp-ckpt_…``, a name :func:`latest_checkpoint` never matches), is flushed and
fsynced, and only then renamed over the final name with ``os.replace``, which is atomic on POSIX and
Windows within one file system; the directory is fsynced after the rename so the new name survives a
power loss. A crash at any point therefore leaves either the complete new checkpoint or none, and the
previous checkpoints untouched. Older checkpoints are deleted only after the new one is in place.

One writer per directory: a save removes temporary files left behind by crashed saves.

Loading uses ``torch.load(weights_only=True)`` (no arbitrary code runs from a checkpoint file), so the
saved dict holds only tensors, numbers, strings, lists, tuples and dicts; :func:`capture_rng_state`
stores NumPy's generator state as a tensor for that reason.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .atomic_file import atomic_write

__all__ = [
    "CheckpointReadError",
    "capture_rng_state",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_newest_intact_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
]

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_TEMP_PREFIX = ".tmp-ckpt_"


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    """Path of the checkpoint of ``step`` in ``directory``: ``directory/ckpt_{step:09d}.pt``."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint_path: step must be a non-negative int, got {step!r}")
    return Path(directory) / f"ckpt_{step:09d}.pt"


def save_checkpoint(state: dict, directory: str | os.PathLike, step: int, keep_last: int | None = 3) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``, then keep only the ``keep_last`` newest
    checkpoints (``None``: keep all). Returns the checkpoint's path. An existing checkpoint of the same
    step is replaced (atomically)."""
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"save_checkpoint: keep_last must be a positive int or None, got {keep_last!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    for stale in directory.glob(_TEMP_PREFIX + "*"):
        stale.unlink(missing_ok=True)
    with atomic_write(final, temp_prefix=f"{_TEMP_PREFIX}{step:09d}.", suffix=".pt") as f:
        torch.save(state, f)
    if keep_last is not None:
        prune_checkpoints(directory, keep_last)
    return final


class CheckpointReadError(RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or not a checkpoint)."""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The dict saved by :func:`save_checkpoint` (tensors mapped to ``map_location``). Raises
    FileNotFoundError for a missing file and :class:`CheckpointReadError` naming the file for one that
    cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a bad file
        raise CheckpointReadError(f"checkpoint {str(path)!r} cannot be read (truncated or corrupt): "
                                  f"{type(error).__name__}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointReadError(f"checkpoint {str(path)!r} does not hold a dict (got {type(state).__name__})")
    return state


def load_newest_intact_checkpoint(directory: str | os.PathLike,
                                  map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
    """``(path, state)`` of the newest checkpoint in ``directory`` that can be read, or None when there is
    none at all. A newer one that cannot be read is skipped with a warning naming it (the file is left
    as it is); when none can be read, :class:`CheckpointReadError` lists them."""
    found = list_checkpoints(directory)
    errors = []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointReadError as error:
            errors.append(str(error))
            warnings.warn(f"{error}; falling back to the newest intact checkpoint", stacklevel=2)
            continue
        return path, state
    if errors:
        raise CheckpointReadError(f"no checkpoint in {str(directory)!r} can be read: " + "; ".join(errors))
    return None


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory`` as ``(step, path)``, oldest first (``[]`` without any)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``directory``, or ``None``. Temporary files of an
    unfinished save are never returned."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune_checkpoints(directory: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints; returns the deleted paths."""
    if not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"prune_checkpoints: keep_last must be a positive int, got {keep_last!r}")
    found = list_checkpoints(directory)
    removed = [path for _, path in found[:-keep_last]]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def capture_rng_state() -> dict:
    """The global random states of this process: torch CPU, CUDA (every device, if initialized),
    Python ``random`` and NumPy's legacy global generator (``np.random.*``)."""
    np_state = np.random.get_state()
    if np_state[0] != "MT19937":
        raise RuntimeError(f"capture_rng_state: NumPy's global generator is {np_state[0]!r}, "
                           f"expected 'MT19937'")
    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda_in_use else [],
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored when CUDA is available and the
    number of devices matches; otherwise they are skipped (a CPU run of a GPU checkpoint)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda", [])
    if cuda_states and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    random.setstate(_as_python_random_state(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))


def _as_python_random_state(state):
    # a round trip through torch.save turns the inner tuple into a list when it was one; random wants tuples
    version, internal, gauss_next = state
    return version, tuple(internal), gauss_next


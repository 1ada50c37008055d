"""Checkpoint files: round trip, atomic writes under crashes, newest lookup, keep-last-k, RNG state."""

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hdlm_reference import checkpoint as ckpt


def make_state(step):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "weights": {"w": torch.randn(4, 3, generator=g), "b": torch.arange(3)},
            "betas": (0.9, 0.95), "name": "run", "history": [1.5, 2.5], "nothing": None}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_state_equal(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype
        else:
            assert a[key] == b[key]


def test_round_trip(tmp_path):
    path = ckpt.save_checkpoint(make_state(7), tmp_path / "ckpts", step=7)
    assert path == tmp_path / "ckpts" / "ckpt_000000007.pt" == ckpt.checkpoint_path(tmp_path / "ckpts", 7)
    assert_state_equal(ckpt.load_checkpoint(path), make_state(7))
    with pytest.raises(FileNotFoundError, match="ckpt_000000008"):
        ckpt.load_checkpoint(tmp_path / "ckpts" / "ckpt_000000008.pt")


def test_latest_checkpoint_and_listing(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "absent") is None
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (3, 120, 40):
        ckpt.save_checkpoint(make_state(step), tmp_path, step, keep_last=None)
    (tmp_path / ".tmp-ckpt_000000999.abc.pt").write_bytes(b"partial")  # an unfinished save
    (tmp_path / "ckpt_notes.txt").write_text("not a checkpoint")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 40, 120]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt_000000120.pt"


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(make_state(step), tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000004.pt", "ckpt_000000005.pt"]
    assert ckpt.prune_checkpoints(tmp_path, 1) == [tmp_path / "ckpt_000000004.pt"]
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.save_checkpoint(make_state(6), tmp_path, 6, keep_last=0)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    ckpt.save_checkpoint(make_state(1), tmp_path, step=1)
    before = (tmp_path / "ckpt_000000001.pt").read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f):
        real_save(obj, f)
        f.seek(0)
        f.truncate(17)  # a partial file on disk
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(make_state(2), tmp_path, step=2, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001.pt"]  # no temp file, nothing pruned
    assert (tmp_path / "ckpt_000000001.pt").read_bytes() == before
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt_000000001.pt"


def test_crash_mid_write_is_never_picked_up(tmp_path):
    ckpt.save_checkpoint(make_state(1), tmp_path, step=1)
    # a process that dies (no exception handling runs) halfway through writing step 2
    script = textwrap.dedent(f"""
        import os, torch
        from hdlm_reference import checkpoint as ckpt

        def die_mid_write(obj, f):
            f.write(b"\\x80\\x02half a pickle")
            f.flush()
            os._exit(9)

        torch.save = die_mid_write
        ckpt.save_checkpoint({{"step": 2}}, {str(tmp_path)!r}, step=2)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # the partial file exists under a temporary name only
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt_000000001.pt"
    assert_state_equal(ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)), make_state(1))
    # the next save clears the leftover
    ckpt.save_checkpoint(make_state(3), tmp_path, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001.pt", "ckpt_000000003.pt"]


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    ckpt.save_checkpoint({"rng": ckpt.capture_rng_state()}, tmp_path, step=0)
    expected = (torch.rand(3), random.random(), np.random.rand(2), np.random.normal())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "ckpt_000000000.pt")["rng"])
    got = (torch.rand(3), random.random(), np.random.rand(2), np.random.normal())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]


def test_loading_refuses_arbitrary_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"x": Payload()}, tmp_path / "ckpt_000000001.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ckpt.load_checkpoint(tmp_path / "ckpt_000000001.pt")

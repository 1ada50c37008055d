"""``make demo`` / ``python -m hdlm_reference.demo``: the harness end to end on a CPU in a few minutes.

Trains the tiny ε-hybrid model on the bundled corpus with interval-packed τ_Block training, draws a
loss curve (PNG), then samples with τ_Block + KV cache + ACS and reports tokens/s with and without the
cache (checking that both give the same text).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import cli


def loss_curve(metrics_path: Path, png_path: Path) -> tuple[list[int], list[float]]:
    """Training-loss records of a run's metrics.jsonl; writes a PNG when matplotlib is installed."""
    steps, losses, val_steps, val_losses = [], [], [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps.append(record["step"])
            losses.append(record["loss"])
        if "val_loss" in record:
            val_steps.append(record["step"])
            val_losses.append(record["val_loss"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss-curve PNG")
        return steps, losses
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, label="training loss (Eq. 10: settled CE + HDCE)")
    if val_steps:
        ax.plot(val_steps, val_losses, "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("tiny ε-hybrid model, packed τ_Block ω=16 training, bundled corpus")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return steps, losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600, a few minutes)")
    parser.add_argument("--num-samples", type=int, default=4)
    args = parser.parse_args(argv)
    out = Path(args.out)
    status = cli.main(["train", "--preset", "tiny", "--steps", str(args.steps), "--out", str(out),
                       "--schedule", "block", "--width", "16", "--log-every", "20",
                       "--ckpt-every", str(max(args.steps // 2, 1)), "--eval-every", str(max(args.steps // 4, 1))])
    if status:
        return status
    steps, losses = loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    status = cli.main(["sample", "--run", str(out), "--num-samples", str(args.num_samples), "--compare-cache",
                       "--method", "acs", "--eta", "0.01", "--prompt", "The "])
    if losses:
        print(f"training loss: {losses[0]:.3f} at step {steps[0]} -> {losses[-1]:.3f} at step {steps[-1]}; "
              f"loss curve: {out / 'loss_curve.png'}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The packed training objective and the `hdlm train` / `hdlm sample` commands end to end."""

import pytest
import torch

from hdlm_reference import cli
from hdlm_reference.model import DiT, ModelConfig
from hdlm_reference.objective import ObjectiveConfig, PackedObjective, StepObjective


@pytest.mark.parametrize("family", ["epsilon", "gamma"])
@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("schedule", ["block", "slide"])
def test_packed_objective_trains_every_parameter_and_is_keyed_by_step(family, config, schedule):
    torch.manual_seed(0)
    model = DiT(ModelConfig.preset("tiny", family=family))
    objective = PackedObjective(ObjectiveConfig(family=family, schedule=schedule, width=8, config=config, bos_id=0),
                                model.config.vocab_size, 32, seed=3)
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    loss, metrics = objective(model, batch, 5)
    assert torch.isfinite(loss) and "loss" not in metrics and metrics["diffusion_tokens"] > 0
    loss.backward()
    # zero-initialized output layer: its gradient is what moves first
    assert model.output_layer.linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        again, _ = objective(model, batch, 5)
        other, _ = objective(model, batch, 6)
    assert again.item() == loss.detach().item()  # the draws are a function of (seed, step)
    assert other.item() != loss.detach().item()


@pytest.mark.parametrize("family", ["epsilon", "gamma"])
@pytest.mark.parametrize("config", ["aligned", "shifted"])
def test_step_objective_feeds_settled_and_active_cells_only(family, config):
    torch.manual_seed(0)
    model = DiT(ModelConfig.preset("tiny", family=family))
    objective = StepObjective(ObjectiveConfig(family=family, schedule="block", width=8, config=config, bos_id=0),
                              model.config.vocab_size, 32, seed=3)
    batch = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    fed_lengths = []
    original_forward = model.forward

    def recording_forward(input_ids, *args, **kwargs):
        fed_lengths.append(input_ids.shape[1])
        return original_forward(input_ids, *args, **kwargs)

    model.forward = recording_forward
    losses = set()
    for step in range(6):
        loss, metrics = objective(model, batch, step)
        assert torch.isfinite(loss) and "loss" not in metrics
        losses.add(round(loss.item(), 6))
    loss.backward()
    assert model.output_layer.linear.weight.grad.abs().sum() > 0
    assert len(losses) > 1  # different steps draw different hyperschedule steps
    assert min(fed_lengths) < 32  # worthless positions are not fed


def test_objective_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="family must be 'epsilon' or 'gamma', got 'delta'"):
        ObjectiveConfig(family="delta").process(10)
    with pytest.raises(ValueError, match="schedule must be 'block' or 'slide', got 'flat'"):
        ObjectiveConfig(schedule="flat").schedule_for(16)
    assert ObjectiveConfig(schedule="slide").attention_context == "causal"
    assert ObjectiveConfig(schedule="block").attention_context == "block_causal"


def test_hdlm_train_then_sample_with_and_without_the_cache(tmp_path, capsys):
    run = tmp_path / "run"
    status = cli.main(["train", "--preset", "tiny", "--steps", "4", "--out", str(run), "--seq-len", "32",
                       "--batch-size", "4", "--width", "8", "--no-progress", "--log-every", "2",
                       "--ckpt-every", "4", "--eval-every", "0", "--val-fraction", "0"])
    assert status == 0
    assert (run / "model_config.json").exists() and (run / "objective.json").exists()
    capsys.readouterr()
    status = cli.main(["sample", "--run", str(run), "--num-samples", "2", "--compare-cache", "--prompt", "The"])
    out = capsys.readouterr().out
    assert status == 0
    assert "checkpoint step 4" in out and "identical samples: True" in out
    assert out.count("--- sample") == 2


def test_hdlm_sample_draws_from_a_gamma_run_with_the_analytic_sampler(tmp_path, capsys):
    run = tmp_path / "run"
    status = cli.main(["train", "--preset", "tiny", "--family", "gamma", "--steps", "2", "--out", str(run),
                       "--seq-len", "16", "--batch-size", "2", "--width", "8", "--no-progress", "--ckpt-every", "2",
                       "--eval-every", "0", "--val-fraction", "0"])
    assert status == 0
    capsys.readouterr()
    status = cli.main(["sample", "--run", str(run), "--num-samples", "2", "--compare-cache",
                       "--sampler-backend", "reference"])
    out = capsys.readouterr().out
    assert status == 0
    assert "method analytic" in out and "identical samples: True" in out and out.count("--- sample") == 2
    assert cli.main(["sample", "--run", str(run), "--method", "acs"]) == 2
    assert "--method acs does not sample a gamma-family run; use one of analytic, euler" in capsys.readouterr().err
    assert cli.main(["sample", "--run", str(run), "--temperature", "0.5"]) == 2
    assert "temperature must be 1.0 for the γ methods" in capsys.readouterr().err


def test_hdlm_sample_reports_a_missing_run(tmp_path, capsys):
    assert cli.main(["sample", "--run", str(tmp_path)]) == 2
    assert "is not a run of `hdlm train`" in capsys.readouterr().err


def test_demo_loss_curve_reads_training_and_validation_records(tmp_path):
    from hdlm_reference.demo import loss_curve

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event": "start", "step": 0}\n{"step": 20, "loss": 5.0}\n{"step": 20, "val_loss": 5.5}\n'
                       '{"step": 40, "loss": 3.0}\n')
    steps, losses = loss_curve(metrics, tmp_path / "curve.png")
    assert steps == [20, 40] and losses == [5.0, 3.0]

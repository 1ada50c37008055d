"""Published-model formats, official conditioning, tokenizers, real-text data and run safety, on tiny
fixtures built at test time in temporary directories (tests/pretrained_fixtures.py); nothing downloads."""

import json
import math
import os
import stat

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers", reason="the pretrained/tokenizer paths need the optional package tokenizers")
pytest.importorskip("safetensors", reason="hub-layout weights need the optional package safetensors")
pytest.importorskip("huggingface_hub", reason="hub ids need the optional package huggingface_hub")

import hdlm_kernels as hk  # noqa: E402
import hdlm_reference as hr  # noqa: E402
from hdlm_reference import cli  # noqa: E402
from hdlm_reference.bpe_tokenizer import BPETokenizer, TiktokenTokenizer  # noqa: E402
from hdlm_reference.conditioning import official_log_score, official_time, sigma_table  # noqa: E402
from hdlm_reference.data import bundled_corpus_path, load_tokens  # noqa: E402
from hdlm_reference.noise import OFFICIAL_LOGLINEAR_EPS, LogLinearNoise  # noqa: E402
from hdlm_reference.text_datasets import (lambada_detokenize, ptb_detokenize,  # noqa: E402
                                          wikitext_detokenize)

from pretrained_fixtures import (TOKENIZER_VOCAB, train_tokenizer, write_hub_cache,  # noqa: E402
                                 write_hub_layout, write_official_run)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    tokenizer = train_tokenizer(root / "tokenizer")
    models = {family: write_hub_layout(root / f"hub_{family}", family, tokenizer) for family in ("gamma", "epsilon")}
    return root, tokenizer, models


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# ---------------------------------------------------------------------------------------------
# official conditioning
# ---------------------------------------------------------------------------------------------

class SigmaSpy(torch.nn.Module):
    """Records the σ̄ a γ model is fed at every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []
        self.conditioning, self.noise = model.conditioning, model.noise  # what load_pretrained recorded

    def forward(self, input_ids, position_ids, mask, sigma=None, **kwargs):
        self.calls.append(sigma.detach().clone())
        return self.model(input_ids, position_ids, mask, sigma=sigma, **kwargs)


def test_official_sigma_per_position_on_a_block_schedule(files):
    """τ_Block (d=12, ω=4, 𝒯=4): at official call s = t + 1, block k = t // 4 is active at official
    level 3 - t % 4 (time 1e-3 + level·0.998/3), earlier blocks are settled (time 1e-4); σ̄ is the
    log-linear schedule with eps 5e-3, fed in float32."""
    _, _, models = files
    model = hr.load_pretrained(files[0] / "hub_gamma").model
    spy = SigmaSpy(model)
    sched = hk.schedules.block(12, 4, 4)
    hr.generate(spy, sched, 1, seed=0, method="analytic", kv_cache=False, sampler_backend="reference")
    assert len(spy.calls) == sched.num_steps == 12

    def sigma(time):
        return -math.log1p(-(1 - 5e-3) * time)

    for t, fed in enumerate(spy.calls):
        block, level = t // 4, 3 - t % 4
        expected = [sigma(1e-4)] * (4 * block) + [sigma(1e-3 + level * (1 - 2e-3) / 3)] * 4
        assert fed.shape == (1, 4 * block + 4)  # settled prefix + the active block; worthless never fed
        assert torch.equal(fed[0], torch.tensor(expected, dtype=torch.float32)), t
    # the paper conditioning of the same model: σ̄(τ/𝒯) on active cells, 0 on settled ones
    spy.calls.clear()
    hr.generate(spy, sched, 1, seed=0, method="analytic", conditioning="paper", sampler_backend="reference")
    fed = spy.calls[5]  # block 1, τ_5 = 3
    noise = LogLinearNoise(OFFICIAL_LOGLINEAR_EPS)
    assert torch.equal(fed[0, :4], torch.zeros(4))
    assert torch.equal(fed[0, 4:], noise(torch.full((4,), 0.75, dtype=torch.float64))[0].float())


def test_official_time_map_and_tables():
    levels = torch.tensor([0, 1, 2, 4, 4])
    active = torch.tensor([True, True, True, True, False])
    time = official_time(levels, 4, active)
    step = (1 - 2e-3) / 3
    assert time.tolist() == [1e-4, 1e-3, 1e-3 + step, 1e-3 + 3 * step, 0.9999]
    table = sigma_table("official", LogLinearNoise(OFFICIAL_LOGLINEAR_EPS), 4)
    assert table.active[0] == 0 and table.clean == pytest.approx(-math.log1p(-(1 - 5e-3) * 1e-4), rel=1e-6)
    assert table.active[4] == pytest.approx(-math.log1p(-(1 - 5e-3) * 0.999), rel=1e-6)
    with pytest.raises(ValueError, match="conditioning must be one of 'paper', 'official', got 'sedd'"):
        sigma_table("sedd", LogLinearNoise(), 4)


def test_the_official_mask_post_process_never_reaches_a_sampled_row():
    """It acts on rows whose next position is settled; settled positions precede every active one."""
    for sched in (hk.schedules.block(12, 4, 4), hk.schedules.slide(12, 4, 8), hk.schedules.slide(12, 4, 2)):
        for t in range(sched.num_steps):
            a, b = sched.split(t)
            assert not any(a <= i < b and i + 1 < a for i in range(sched.length))
    logits = torch.randn(1, 3, 5)
    settled = torch.tensor([[True, True, False]])
    score = official_log_score(logits, torch.full((1, 3), 0.5), settled)
    assert score[0, 0, -1] == -1000 and score[0, 1, -1] != -1000 and score[0, 2, -1] != -1000


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gamma", "epsilon"])
def test_hub_layout_loads_strictly_and_samples(files, family):
    root, _, models = files
    m = hr.load_pretrained(root / f"hub_{family}")
    assert same_weights(m.model, models[family]) and not m.model.training
    assert (m.family, m.conditioning, m.kind, m.tokenizer.num_tokens) == (family, "official", "directory", TOKENIZER_VOCAB)
    assert m.value == (0.05 if family == "gamma" else 0.02) and m.noise.eps == OFFICIAL_LOGLINEAR_EPS
    assert m.model.conditioning == "official" and m.model.noise is m.noise
    sched = m.schedule()
    options = m.sample_options()
    cached = hr.generate(m.model, sched, 2, seed=3, kv_cache=True, **options)
    uncached = hr.generate(m.model, sched, 2, seed=3, kv_cache=False, **options)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert int(cached.tokens.max()) < m.tokenizer.num_tokens
    assert isinstance(m.tokenizer.decode(cached.tokens[0]), str)


def test_official_checkpoint_raw_and_ema_with_hydra_config(tmp_path, files):
    _, tokenizer, _ = files
    path, raw, ema = write_official_run(tmp_path / "run", "gamma", tokenizer, step=7)
    loaded = hr.load_pretrained(path)
    assert same_weights(loaded.model, ema) and loaded.step == 7 and loaded.weights == "ema"
    assert loaded.objective.levels == 4  # eval_tau: ${annealing.tau} resolved
    assert isinstance(loaded.tokenizer, BPETokenizer) and loaded.tokenizer.num_tokens == TOKENIZER_VOCAB
    assert same_weights(hr.load_pretrained(tmp_path / "run", ema=False).model, raw)  # the run directory
    bf16 = hr.load_pretrained(path, dtype=torch.bfloat16)
    assert bf16.model.blocks[0].attn_qkv.weight.dtype == torch.bfloat16
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32


def test_hub_id_offline_from_the_cache_and_clear_errors(tmp_path, files, monkeypatch):
    root, _, models = files
    write_hub_cache(tmp_path / "cache", "hdlm-group/hdlm-base-gamma-0.05", root / "hub_gamma")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = hr.load_pretrained("hdlm-group/hdlm-base-gamma-0.05", cache_dir=tmp_path / "cache")
    assert m.kind == "hub" and same_weights(m.model, models["gamma"])
    with pytest.raises(hr.ModelNotAvailableError, match="'hdlm-group/hdlm-base-gamma-0.5'.*HF_HUB_OFFLINE"):
        hr.load_pretrained("hdlm-group/hdlm-base-gamma-0.5", cache_dir=tmp_path / "cache")


def test_mismatches_are_refused(tmp_path, files):
    from safetensors.torch import load_file, save_file

    root, tokenizer, _ = files
    bad = tmp_path / "bad"
    write_hub_layout(bad, "gamma", tokenizer)
    state = load_file(str(bad / "model.safetensors"))
    del state["sigma_map.mlp.0.bias"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(hr.PretrainedError, match="model.safetensors does not match.*sigma_map.mlp.0.bias"):
        hr.load_pretrained(bad)
    flags = tmp_path / "flags"
    write_hub_layout(flags, "gamma", tokenizer)
    cfg = json.loads((flags / "config.json").read_text())
    cfg["model"]["scale_by_sigma"] = False
    (flags / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hr.PretrainedError, match="model.scale_by_sigma is False"):
        hr.load_pretrained(flags)
    other = tmp_path / "other_tokens"
    write_hub_layout(other, "epsilon", tokenizer, tokens=TOKENIZER_VOCAB + 5)
    with pytest.raises(hr.PretrainedError, match="tokenizer has 320 tokens.*tokenizer.tokens = 325"):
        hr.load_pretrained(other)
    with pytest.raises(hr.PretrainedError, match="holds no model"):
        hr.load_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# tokenizers and data
# ---------------------------------------------------------------------------------------------

def test_bpe_tokenizers_agree_and_round_trip(tmp_path, files):
    _, tokenizer_dir, _ = files
    text = "".join(p.read_text() for p in sorted(bundled_corpus_path().glob("*.txt")))[:4000] + " héllo <|endoftext|>"
    from_json = BPETokenizer.from_directory(tokenizer_dir)
    merges_only = tmp_path / "merges_only"
    merges_only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (merges_only / name).write_bytes((tokenizer_dir / name).read_bytes())
    ids = from_json.encode(text)
    assert BPETokenizer.from_directory(merges_only).encode(text) == ids
    assert from_json.decode(ids) == text and ids[-1] == from_json.eos_id
    assert from_json.decode([ids[0], from_json.mask_id]).endswith("\u2591")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 321\)"):
        from_json.decode([321])
    pytest.importorskip("tiktoken", reason="the tiktoken path needs the optional package tiktoken")
    assert TiktokenTokenizer.from_directory(tokenizer_dir).encode(text) == ids
    assert TiktokenTokenizer.from_directory(merges_only).decode(ids) == text


def test_detokenizers():
    assert wikitext_detokenize("a @-@ b @,@ c ( x ) = = Title = = \n") == "a-b,c (x) == Title ==\n"
    assert ptb_detokenize("he does n't see the $ N million N N report 's") == "he doesn't see the $1 million 1 1 report's"
    assert lambada_detokenize("  \u201cquoted\u201d  ") == '\n"quoted"'


def test_prepare_bin_with_a_bpe_tokenizer_in_shards(tmp_path, files, capsys):
    _, tokenizer_dir, _ = files
    out = tmp_path / "corpus.bin"
    assert cli.main(["prepare-bin", str(bundled_corpus_path()), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                     "--shard-tokens", "3000", "--workers", "1", "--no-progress"]) == 0
    shards = sorted(tmp_path.glob("corpus_*.bin"))
    assert len(shards) > 1 and "shards" in capsys.readouterr().out
    joined = np.concatenate([load_tokens(p) for p in shards])
    expected = load_tokens(bundled_corpus_path(), BPETokenizer.from_directory(tokenizer_dir))
    assert joined.tolist() == expected.tolist()
    assert cli.main(["prepare-bin", "--out", str(out)]) == 2
    assert "give text PATHs or --dataset" in capsys.readouterr().err
    # two worker processes write the same stream
    assert cli.main(["prepare-bin", str(bundled_corpus_path()), "--tokenizer", str(tokenizer_dir), "--out",
                     str(tmp_path / "parallel.bin"), "--workers", "2", "--no-progress"]) == 0
    assert load_tokens(tmp_path / "parallel.bin").tolist() == expected.tolist()


def test_prepare_bin_from_a_saved_dataset(tmp_path, files):
    datasets = pytest.importorskip("datasets", reason="--dataset needs the optional package datasets")
    texts = [p.read_text() for p in sorted(bundled_corpus_path().glob("*.txt"))]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    assert cli.main(["prepare-bin", "--dataset", str(tmp_path / "saved"), "--out", str(tmp_path / "d.bin"),
                     "--workers", "1", "--no-progress"]) == 0
    assert load_tokens(tmp_path / "d.bin").tolist() == load_tokens(bundled_corpus_path(), hr.ByteTokenizer()).tolist()


# ---------------------------------------------------------------------------------------------
# the command line on an official-layout model
# ---------------------------------------------------------------------------------------------

def test_cli_sample_and_eval_an_official_layout_model(tmp_path, files, capsys):
    root, _, _ = files
    out = tmp_path / "samples.jsonl"
    assert cli.main(["sample", "--model", str(root / "hub_gamma"), "--num-samples", "2", "--prompt", "The",
                     "--out", str(out), "--no-progress", "--sampler-backend", "reference"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(row["text"].startswith("The") and row["conditioning"] == "official" for row in rows)
    assert printed.count("--- sample") == 2 and rows[0]["text"] in printed
    assert "2 samples x 32 tokens" in printed.splitlines()[-1] and "official conditioning" in printed
    assert cli.main(["sample", "--model", str(root / "hub_epsilon"), "--schedule", "flat", "--steps", "8",
                     "--length", "16", "--num-samples", "1", "--no-progress"]) == 0
    assert "flat ω=16 𝒯=8" in capsys.readouterr().out
    assert cli.main(["eval", "--model", str(root / "hub_epsilon"), "--dataset", str(bundled_corpus_path()),
                     "--num-batches", "1", "--batch-size", "2", "--mc-samples", "2", "--no-progress",
                     "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "all of" in printed and "2 sequences of 32 tokens" in printed
    assert math.isfinite(float(printed.split("NLL upper bound (nats/token)")[1].split()[0]))


def test_cli_input_errors_have_no_traceback(files, capsys):
    root, _, _ = files
    model = str(root / "hub_gamma")
    assert cli.main(["sample", "--model", model, "--prompt", "word " * 40, "--no-progress"]) == 2
    assert "--prompt is" in capsys.readouterr().err
    assert cli.main(["sample", "--model", model, "--length", "4", "--no-progress"]) == 2
    assert "--length 4 is smaller than the window width 8" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["sample", "--model", model, "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
    assert cli.main(["sample", "--model", str(root / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# runs lose nothing
# ---------------------------------------------------------------------------------------------

TRAIN = ["train", "--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--width", "8", "--no-progress",
         "--eval-every", "0", "--val-fraction", "0", "--log-every", "1"]


def snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_resume_with_other_settings_is_refused_before_anything_is_written(tmp_path, files, capsys):
    _, tokenizer_dir, _ = files
    run = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        assert cli.main([*TRAIN, "--steps", "2", "--ckpt-every", "1", "--out", str(run)]) == 0
    finally:
        os.umask(previous)
    for path in [run / "config.json", run / "model_config.json", *(run / "checkpoints").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    before = snapshot(run)
    for change, message in ((["--family", "gamma"], "model_config.family: 'epsilon' -> 'gamma'"),
                            (["--width", "4"], "objective.width: 8 -> 4"),
                            (["--batch-size", "4"], "train.batch_size: 2 -> 4"),
                            (["--schedule", "slide"], "objective.schedule: 'block' -> 'slide'"),
                            (["--tokenizer", str(tokenizer_dir)], "tokenizer.kind: 'byte' -> 'bpe'"),
                            (["--no-resume"], "--no-resume, but")):
        args = [*TRAIN, "--steps", "3", "--out", str(run)]
        for i in range(0, len(change), 2):  # replace an option already in TRAIN, or add it
            if change[i] in args and i + 1 < len(change):
                args[args.index(change[i]) + 1] = change[i + 1]
            else:
                args += change[i:i + 2]
        assert cli.main(args) == 2, change
        assert message in capsys.readouterr().err
        assert snapshot(run) == before, change
    # a corrupt newest checkpoint: named, and the newest intact one is used (sample, then train)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"{newest.name}.*cannot be read"):
        assert cli.main(["sample", "--run", str(run), "--num-samples", "1", "--no-progress"]) == 0
    assert "checkpoint step 1" in capsys.readouterr().out
    with pytest.warns(UserWarning, match=f"{newest.name}.*cannot be read"):
        assert cli.main([*TRAIN, "--steps", "2", "--ckpt-every", "1", "--out", str(run)]) == 0
    assert (run / "checkpoints" / (newest.name + ".unreadable")).exists()
    assert hr.load_run(run).step == 2
    assert cli.main(["sample", "--run", str(run), "--checkpoint", "ckpt_000000001.pt", "--num-samples", "1",
                     "--no-progress"]) == 0
    assert "checkpoint step 1" in capsys.readouterr().out


def test_a_bpe_run_samples_and_scores_with_its_own_tokenizer(tmp_path, files, capsys):
    _, tokenizer_dir, _ = files
    data = tmp_path / "corpus.bin"
    assert cli.main(["prepare-bin", str(bundled_corpus_path()), "--tokenizer", str(tokenizer_dir), "--out",
                     str(data), "--workers", "1", "--no-progress"]) == 0
    run = tmp_path / "bpe"
    assert cli.main([*TRAIN, "--steps", "1", "--out", str(run), "--data", str(data), "--vocab-size", "50257"]) == 2
    assert "--vocab-size 50257 but --tokenizer byte has 256 token ids" in capsys.readouterr().err
    assert not run.exists()
    assert cli.main([*TRAIN, "--steps", "1", "--out", str(run), "--data", str(data), "--tokenizer",
                     str(tokenizer_dir)]) == 0
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert cli.main(["sample", "--run", str(run), "--num-samples", "1", "--prompt", "The keeper", "--no-progress"]) == 0
    assert "The keeper" in capsys.readouterr().out
    assert cli.main(["eval", "--run", str(run), "--num-batches", "1", "--batch-size", "2", "--mc-samples", "2",
                     "--no-progress"]) == 0
    value = float(capsys.readouterr().out.split("NLL upper bound (nats/token)")[1].split()[0])
    assert 0.5 * math.log(TOKENIZER_VOCAB) < value < 3 * math.log(TOKENIZER_VOCAB)

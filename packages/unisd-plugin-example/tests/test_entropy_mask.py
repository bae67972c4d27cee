"""The example plugin: its formula, and that installing the distribution is all unisd needs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from unisd import OptionError, UsageError
from unisd.cli.app import make_app
from unisd.components import make_options
from unisd.plugins import get_plugin_manager
from unisd.testing import make_tiny_model_dir, toy_records, write_jsonl

PACKAGE = Path(__file__).resolve().parents[1]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Make the distribution visible the way pip would: a *.dist-info with entry_points.txt on sys.path."""
    site = tmp_path / "site"
    info = site / "unisd_plugin_example-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: unisd-plugin-example\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[unisd]\nentropy_mask = unisd_entropy_mask.plugin\n")
    monkeypatch.syspath_prepend(str(PACKAGE / "src"))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_entropy_mask_keeps_the_top_rho_tokens(installed):
    from unisd_entropy_mask import EntropyMask

    comp = EntropyMask(make_options(EntropyMask, {"rho": "0.5"}))
    entropy = torch.tensor([[0.1, 2.0, 0.5, 9.0], [3.0, 0.2, 7.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # Loss-token entropies [0.1, 2, 0.5, 3, 0.2, 7, 0]: the median (the 1−0.5 quantile) is 0.5.
    batch = SimpleNamespace(step=1, step_entropy=[entropy], step_masks=[mask])  # the step is one micro-batch
    w = comp.token_weights(SimpleNamespace(entropy=entropy, mask=mask), batch)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]]))
    assert comp.metrics() == {"kept_fraction": pytest.approx(4 / 7), "threshold": pytest.approx(0.5)}
    everything = EntropyMask(make_options(EntropyMask, {"rho": "1"}))
    assert not everything.needs_step_scores
    torch.testing.assert_close(everything.token_weights(SimpleNamespace(entropy=entropy, mask=mask),
                                                        SimpleNamespace(step=1)), torch.ones(2, 4))
    with pytest.raises(OptionError, match="rho"):
        make_options(EntropyMask, {"rho": "0"})


def test_entropy_threshold_is_taken_over_the_whole_step(installed):
    from unisd_entropy_mask import EntropyMask

    comp = EntropyMask(make_options(EntropyMask, {"rho": "0.5"}))
    assert comp.needs_step_scores
    first, first_mask = torch.tensor([[0.1, 2.0, 0.5]]), torch.ones(1, 3)
    second, second_mask = torch.tensor([[5.0, 6.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    # The step's loss-token entropies [0.1, 2, 0.5, 5, 6] have median 2: in the first micro-batch only
    # the 2 is kept (its own median, 0.5, would keep two tokens).
    batch = SimpleNamespace(step=1, step_entropy=[first, second], step_masks=[first_mask, second_mask])
    w = comp.token_weights(SimpleNamespace(entropy=first, mask=first_mask), batch)
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 0.0]]))
    assert comp.metrics()["threshold"] == pytest.approx(2.0)
    with pytest.raises(UsageError, match="step_entropy"):
        comp.token_weights(SimpleNamespace(entropy=first, mask=first_mask), SimpleNamespace(step=2))


def _really_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("unisd-plugin-example")
    except PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(_really_installed(), reason="unisd-plugin-example is pip-installed in this environment")
def test_not_visible_without_the_distribution():
    assert "entropy-mask" not in get_plugin_manager().registries.components


def test_installed_plugin_is_listed_and_usable_with_with(installed, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(make_app(get_plugin_manager()), ["plugins", "--json"], catch_exceptions=False)
    data = json.loads(listed.output)
    entry = {c["name"]: c for c in data["components"]}["entropy-mask"]
    assert entry["provider"] == "unisd-plugin-example"
    assert entry["options"][0]["name"] == "rho" and entry["options"][0]["help"]
    assert any(p["name"] == "entropy_mask" and p["status"] == "loaded" for p in data["plugins"])

    model = make_tiny_model_dir(tmp_path / "model")
    data_file = write_jsonl(tmp_path / "train.jsonl", toy_records(4))
    out = tmp_path / "run"
    result = runner.invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(model), "--data", str(data_file), "--output", str(out), "--steps", "1",
        "--batch-size", "2", "--grad-accum", "2", "--max-new-tokens", "6", "--with", "entropy-mask",
        "-o", "entropy-mask.rho=0.5",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 < record["entropy-mask/kept_fraction"] <= 1.0
    assert record["token_weight_mean"] < 1.0  # the mask really removed tokens from the loss


def test_update_does_not_depend_on_the_micro_batch_split(installed, tmp_path):
    """1×8 and 8×1 micro-batches of the same completions give the same update (≤ 1e-5 relative): the
    threshold is one number for the whole optimiser step."""
    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter
    from unisd.model.rollout import Completion
    from unisd.run import build_run
    from unisd.step import distill_step

    model = make_tiny_model_dir(tmp_path / "model")
    data_file = write_jsonl(tmp_path / "train.jsonl", toy_records(8))
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(10, 60, (2 + i % 5,), generator=gen).tolist() for i in range(8)]
    updates, kept = [], []
    for batch_size in (8, 1):
        cfg = RunConfig(model=str(model), data=str(data_file), lora_dropout=0.0, max_new_tokens=8,
                        batch_size=batch_size, grad_accum=8 // batch_size, components={"entropy-mask": {"rho": 0.5}})
        run = build_run(cfg, get_plugin_manager(), Reporter(), None)
        torch.manual_seed(123)
        with torch.no_grad():  # LoRA B starts at zero: move the student off its teacher
            for name, p in run.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        eos = run.tokenizer.eos_token_id
        distill_step(run, run.examples[:8], [Completion(c + [eos], False) for c in ids])
        updates.append([p.grad.detach().clone() for p in run.model.parameters() if p.requires_grad])
        kept.append(run.components[0].metrics()["kept_fraction"])
    assert 0.4 < kept[0] < 0.6 and kept[1] == pytest.approx(kept[0])  # half the step's tokens, either way
    for a, b in zip(*updates, strict=True):
        assert b.norm() > 0
        assert ((a - b).norm() / b.norm()).item() <= 1e-5

"""The example plugin: its formula, and that installing the distribution is all unisd needs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.components import make_options
from unisd.errors import OptionError
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
    w = comp.token_weights(SimpleNamespace(entropy=entropy, mask=mask), SimpleNamespace(step=1))
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]]))
    assert comp.metrics() == {"kept_fraction": pytest.approx(4 / 7), "threshold": pytest.approx(0.5)}
    everything = EntropyMask(make_options(EntropyMask, {"rho": "1"}))
    torch.testing.assert_close(everything.token_weights(SimpleNamespace(entropy=entropy, mask=mask),
                                                        SimpleNamespace(step=1)), torch.ones(2, 4))
    with pytest.raises(OptionError, match="rho"):
        make_options(EntropyMask, {"rho": "0"})


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

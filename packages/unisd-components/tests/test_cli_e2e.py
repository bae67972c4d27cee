"""End to end through the CLI on a tiny model: every component together, the UniSD* preset, errors."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.data.tasks import load_jsonl_examples
from unisd.plugins import get_plugin_manager
from unisd_components.contexts.retrieval import EMBEDDER_NAME, cached_embeddings, embedding_text

runner = CliRunner()
COMMON = ["--steps", "2", "--batch-size", "2", "--grad-accum", "2", "--max-new-tokens", "6", "--lr", "1e-3"]


def invoke(args):
    return runner.invoke(make_app(get_plugin_manager()), args, catch_exceptions=False)


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_all_five_components_train_end_to_end(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    result = invoke([
        "train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out), *COMMON,
        "--with", "ema", "--with", "agreement", "--with", "contrastive", "--with", "matching", "--with", "clip",
        "-o", "ema.sync_steps=1", "-o", "agreement.num_contexts=2", "-o", "clip.quantile=0.9",
    ])
    assert result.exit_code == 0, result.output
    assert "have no negative" in result.output  # the example without one is reported
    records = metrics_of(out)
    assert [r["step"] for r in records] == [1, 2]
    last = records[-1]
    for key in ("agreement/weight_mean", "agreement/disagreement_max", "contrastive/violation_rate",
                "contrastive/pos_dist_mean", "matching/loss", "clip/fraction", "clip/cap", "ema/distance",
                "loss/contrastive", "loss/matching"):
        assert key in last, key
    assert last["ema/updates"] == 2.0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert (out / "final").is_dir()


def test_unisd_star_preset_trains_end_to_end(tiny_model_dir, data_file, tmp_path, private_cache):
    # Pre-fill the MiniLM embedding cache so the preset's retrieval builder runs without the model.
    texts = [embedding_text(e) for e in load_jsonl_examples(data_file)]
    gen = torch.Generator().manual_seed(0)
    cached_embeddings(texts, lambda: (lambda t: torch.randn(len(t), 8, generator=gen)), EMBEDDER_NAME,
                      folder=private_cache / "embeddings")
    out = tmp_path / "star"
    result = invoke(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out),
                     "--preset", "unisd-star", *COMMON])
    assert result.exit_code == 0, result.output
    config = (out / "config.toml").read_text()
    assert "[components.agreement]" in config and 'builder = "retrieval"' in config and "gamma = 0.001" in config
    assert "beta = 0.98" in config and "margin = 0.1" in config
    last = metrics_of(out)[-1]
    assert {"agreement/weight_mean", "contrastive/loss", "matching/loss", "ema/distance"} <= set(last)


def test_misspelt_component_exits_2_with_suggestion(tiny_model_dir, data_file, tmp_path):
    result = invoke(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--with", "emma",
                     "--output", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "Unknown component 'emma'. Did you mean: ema?" in result.output


def test_both_clip_options_is_a_usage_error(tiny_model_dir, data_file, tmp_path):
    result = invoke(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--with", "clip",
                     "-o", "clip.max_value=5", "-o", "clip.quantile=0.9", "--output", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "mutually exclusive" in result.output


def test_plugins_lists_components_options_and_presets():
    result = invoke(["plugins", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    comps = {c["name"]: c for c in data["components"]}
    assert {"agreement", "clip", "contrastive", "ema", "matching"} <= set(comps)
    assert all(c["provider"] == "unisd-components" for n, c in comps.items() if n in ("ema", "clip"))
    ema_opts = {o["name"]: o for o in comps["ema"]["options"]}
    assert ema_opts["beta"]["default"] == 0.9 and ema_opts["sync_steps"]["default"] == 10 and ema_opts["beta"]["help"]
    presets = {p["name"]: p for p in data["presets"]}
    expected = {f"agreement_{lv}_{b}" for lv in ("seq", "tok") for b in ("random", "retrieval", "induction")}
    assert expected | {"unisd-star", "ema", "contrastive", "match_joint", "match_repr", "clip"} <= set(presets)
    assert presets["unisd-star"]["components"]["ema"] == {"sync_steps": 10, "beta": 0.98}


def test_ema_state_survives_resume(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "ema"
    first = invoke(["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--output", str(out),
                    *COMMON[:1], "1", *COMMON[2:], "--with", "ema", "-o", "ema.sync_steps=1"])
    assert first.exit_code == 0, first.output
    saved = torch.load(out / "checkpoints" / "step-1" / "components.pt", weights_only=False)["ema"]
    assert saved["updates"] == 1 and saved["mode"] == "lora"
    resumed = invoke(["train", "--resume", str(out), "--steps", "2"])
    assert resumed.exit_code == 0, resumed.output
    records = metrics_of(out)
    assert [r["ema/updates"] for r in records] == [1.0, 2.0]  # the count (and shadow) came back from the checkpoint

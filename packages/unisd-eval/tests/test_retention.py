"""`unisd eval retention` (§5.5): JSD of a trained model against its base, and PPL_ret, on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.divergence.losses import generalized_jsd
from unisd.plugins import get_plugin_manager
from unisd.testing import make_tiny_model_dir, make_tokenizer
from unisd_eval.retention import base_of, score_direction

COMMON = ["--prompts-from", "demo", "--limit", "3", "--max-new-tokens", "6", "--batch-size", "2"]


@pytest.fixture(scope="module")
def app():
    return make_app(get_plugin_manager())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("retention") / "base")


@pytest.fixture(scope="module")
def perturbed_dir(base_dir, tmp_path_factory):
    """The base with every weight moved a little: a stand-in for a trained student."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("retention") / "perturbed"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(path)
    return path


def retention(app, model, base, out, *extra):
    args = ["eval", "retention", "--model", str(model), *(["--base", str(base)] if base else []),
            "--output", str(out), *extra]
    result = CliRunner().invoke(app, args)
    return result, (json.loads((out / "results.json").read_text()) if result.exit_code == 0 else None)


def test_base_against_itself_is_zero(app, base_dir, tmp_path):
    result, res = retention(app, base_dir, base_dir, tmp_path / "same", *COMMON)
    assert result.exit_code == 0, result.output
    m = res["metrics"]
    assert m["jsd_forward"] == pytest.approx(0.0, abs=1e-6) and m["jsd_reverse"] == pytest.approx(0.0, abs=1e-6)
    assert m["items"] == 3 and m["tokens_forward"] > 0 and m["ppl_ret"] > 1.0
    assert m["logp_base_on_model"] == pytest.approx(m["logp_model_on_base"], abs=1e-5)  # same text, same model
    assert res["prompts"] == {"task": "demo", "split": "test", "source": "--prompts-from"}
    rows = [json.loads(line) for line in (tmp_path / "same" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["completion_model"] == rows[0]["completion_base"]


def test_changed_weights_give_a_positive_divergence(app, base_dir, perturbed_dir, tmp_path):
    result, res = retention(app, perturbed_dir, base_dir, tmp_path / "moved", *COMMON)
    assert result.exit_code == 0, result.output
    m = res["metrics"]
    assert 1e-4 < m["jsd_forward"] <= math.log(2) and 1e-4 < m["jsd_reverse"] <= math.log(2)
    assert m["jsd_forward/p10"] <= m["jsd_forward/median"] <= m["jsd_forward/p90"]
    assert 0.0 <= m["jsd_delta/win_rate"] <= 1.0 and "jsd_forward" in result.output


def test_jsd_matches_the_plain_full_vocabulary_formula(base_dir, perturbed_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(perturbed_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tok = make_tokenizer()
    prompts = [tok("What is 12 + 34?")["input_ids"], tok("def add(a, b):")["input_ids"]]
    completions = [tok(" 46")["input_ids"] + [tok.eos_token_id], tok(" return a + b")["input_ids"]]
    got = score_direction(model, base, prompts, completions, tok.pad_token_id, batch_size=2)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lq, lp = model(ids).logits[0, len(p) - 1 : -1], base(ids).logits[0, len(p) - 1 : -1]
        jsd = 0.25 * generalized_jsd(lq.double(), lp.double(), alpha=0.5)  # the plain JSD in [0, ln 2]
        logp = torch.log_softmax(lp.double(), -1).gather(-1, torch.tensor(c).unsqueeze(-1)).mean()
        assert got.jsd[i] == pytest.approx(jsd.mean().item(), rel=1e-4, abs=1e-7)
        assert got.logp[i] == pytest.approx(logp.item(), rel=1e-4)
        assert got.tokens[i] == len(c)


def test_one_training_step_moves_the_student_and_the_base_comes_from_the_adapter(app, base_dir, tmp_path):
    run = tmp_path / "run"
    trained = CliRunner().invoke(app, ["train", "--model", str(base_dir), "--task", "demo", "--steps", "1",
                                       "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4",
                                       "--lr", "5e-2", "--output", str(run)])
    assert trained.exit_code == 0, trained.output
    assert base_of(str(run / "final"), None) == str(base_dir.resolve())
    result, res = retention(app, run / "final", None, tmp_path / "ret", "--limit", "2", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert res["config"]["base"] == str(base_dir.resolve())
    assert res["prompts"]["task"] == "demo" and "the run's task" in res["prompts"]["source"]
    assert res["metrics"]["jsd_forward"] > 0 and res["metrics"]["jsd_reverse"] > 0


def test_bad_retention_input_exits_2(app, base_dir, tmp_path):
    result, _ = retention(app, base_dir, None, tmp_path / "a", *COMMON)
    assert result.exit_code == 2 and "give --base BASE" in result.output
    result = CliRunner().invoke(app, ["eval", "demo", "--model", str(base_dir), "--base", str(base_dir),
                                      "--output", str(tmp_path / "b")])
    assert result.exit_code == 2 and "--base and --prompts-from apply to `unisd eval retention`" in result.output
    result = CliRunner().invoke(app, ["eval", "retention", "--predictions", str(tmp_path / "p.jsonl"),
                                      "--output", str(tmp_path / "c")])
    assert result.exit_code == 2 and "needs --model RUN/final" in result.output
    result = CliRunner().invoke(app, ["eval", "retention", "--model", str(base_dir), "--base", str(base_dir),
                                      "--samples", "3", "--output", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--samples and --protocol do not apply" in result.output

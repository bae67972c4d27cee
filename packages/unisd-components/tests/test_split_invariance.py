"""Every component gives the same update however the optimiser step is split into micro-batches
(issue 13, item 6): 1×8 and 8×1 micro-batches of the same 8 completions, on a tiny LoRA model."""

from __future__ import annotations

import pytest
import torch

from unisd.config import RunConfig
from unisd.io.reporting import Reporter
from unisd.model.rollout import Completion
from unisd.plugins import get_plugin_manager
from unisd.run import build_run
from unisd.step import distill_step
from unisd.testing import make_tiny_model, make_tokenizer, toy_records, write_jsonl

STAR = {"agreement": {"num_contexts": 2, "gamma": 5.0}, "ema": {"sync_steps": 1},
        "contrastive": {"weight": 0.5, "margin": 0.5}, "matching": {"mode": "joint", "weight": 0.1}}
CASES = {
    "ema": {"ema": {"sync_steps": 1, "beta": 0.9}},
    "agreement-token": {"agreement": {"num_contexts": 2, "gamma": 5.0}},
    "agreement-seq": {"agreement": {"level": "seq", "num_contexts": 2, "gamma": 5.0}},
    "contrastive": {"contrastive": {"weight": 0.5, "margin": 0.5}},
    "matching-joint": {"matching": {"mode": "joint", "weight": 0.1}},
    "matching-repr": {"matching": {"mode": "repr"}},
    "clip-static": {"clip": {"max_value": 0.3}},
    "clip-quantile": {"clip": {"quantile": 0.7}},
    "leak-guard": {"leak-guard": {}},
    "all": {**STAR, "clip": {"quantile": 0.7}, "leak-guard": {}},
}


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """The tiny random model with larger weights (query and key projections ×30, the rest ×4). At its random
    initialisation it barely reads the prompt, so the agreement contexts would change its log-probs by
    ~1e-3 and their variance would be mostly float rounding; sharpened, contexts move them by ~0.4."""
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(30.0 if ("q_proj" in name or "k_proj" in name) else 4.0)
    path = tmp_path_factory.mktemp("sharp") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def negatives_file(tmp_path):
    """Eight records, each with a hand-made wrong demonstration (contrastive needs no cache then)."""
    records = toy_records(8)
    for r in records:
        r["meta"]["negative_reference"] = str(int(r["reference"]) + 1)
    return write_jsonl(tmp_path / "train.jsonl", records)


LEAK = "42 This is an example for a response to the question:"  # copies the teacher's template


def completions(tokenizer, n=8):
    """Random completions of 3-7 tokens; every fourth one copies the teacher template (for leak-guard)."""
    gen = torch.Generator().manual_seed(0)
    eos = tokenizer.eos_token_id
    out = []
    for i in range(n):
        ids = torch.randint(10, len(tokenizer) - 1, (2 + i % 5,), generator=gen).tolist()
        if i % 4 == 0:
            ids = tokenizer.encode(LEAK, add_special_tokens=False)
        out.append(Completion(ids + [eos], False))
    return out


def one_step(model_dir, data, components, batch_size, **overrides):
    """The gradient of one optimiser step of 8 completions, in micro-batches of ``batch_size``, and the run."""
    cfg = RunConfig(model=str(model_dir), data=str(data), lora_dropout=0.0, max_new_tokens=8, batch_size=batch_size,
                    grad_accum=8 // batch_size, components=components, **overrides)
    run = build_run(cfg, get_plugin_manager(), Reporter(), None)
    torch.manual_seed(123)
    with torch.no_grad():  # LoRA B starts at zero: move the student off its teacher
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    distill_step(run, run.examples[:8], completions(run.tokenizer))
    return [p.grad.detach().clone() for p in run.model.parameters() if p.requires_grad], run


def assert_same_update(a, b, tol=1e-5):
    for x, y in zip(a, b, strict=True):
        assert y.norm() > 0
        assert ((x - y).norm() / y.norm()).item() <= tol


@pytest.mark.parametrize("case", list(CASES))
def test_component_update_does_not_depend_on_the_micro_batch_split(sharp_model_dir, negatives_file, case):
    whole, run = one_step(sharp_model_dir, negatives_file, CASES[case], batch_size=8)
    split, split_run = one_step(sharp_model_dir, negatives_file, CASES[case], batch_size=1)
    assert_same_update(split, whole)
    metrics = {c.name: c.metrics() for c in run.components if hasattr(c, "metrics")}
    split_metrics = {c.name: c.metrics() for c in split_run.components if hasattr(c, "metrics")}
    if "clip" in metrics:  # the cap acts, and is one number for the step whatever the split
        assert 0 < metrics["clip"]["fraction"] < 1
        assert split_metrics["clip"] == pytest.approx(metrics["clip"], rel=1e-6)
    if "agreement" in metrics:
        assert metrics["agreement"]["weight_min"] < 1.0
    if "leak-guard" in metrics:
        assert metrics["leak-guard"]["leaking_fraction"] == pytest.approx(2 / 8)


@pytest.mark.parametrize("reduction", ["sequence"])
def test_the_whole_recipe_is_split_invariant_under_the_sequence_reduction(sharp_model_dir, negatives_file, reduction):
    whole, _ = one_step(sharp_model_dir, negatives_file, CASES["all"], batch_size=8, loss_reduction=reduction)
    split, _ = one_step(sharp_model_dir, negatives_file, CASES["all"], batch_size=1, loss_reduction=reduction)
    assert_same_update(split, whole)


def test_the_no_grad_pass_runs_only_when_a_component_asks(sharp_model_dir, negatives_file, monkeypatch):
    """``needs_step_scores`` costs one more student forward per micro-batch; nothing else pays it."""
    import unisd.step as step

    calls = []
    real = step._student_outputs
    monkeypatch.setattr(step, "_student_outputs", lambda *a: calls.append(torch.is_grad_enabled()) or real(*a))
    one_step(sharp_model_dir, negatives_file, CASES["clip-static"], batch_size=4)
    assert calls == [True, True]
    calls.clear()
    one_step(sharp_model_dir, negatives_file, CASES["clip-quantile"], batch_size=4)
    assert calls == [False, False, True, True]

"""The run settings that change the loss's scale: ``loss_reduction`` and ``gjsd_scale`` (issue 13, items 8-9)."""

from __future__ import annotations

import pytest
import torch

from unisd.config import RunConfig
from unisd.divergence import reduction
from unisd.errors import ConfigError, UsageError
from unisd.io.reporting import Reporter
from unisd.model.rollout import Completion
from unisd.parallel import distributed
from unisd.plugins import get_plugin_manager
from unisd.run import build_run
from unisd.step import distill_step


def make_run(model_dir, data, **overrides):
    cfg = RunConfig(model=str(model_dir), data=str(data), lora_dropout=0.0, max_new_tokens=8, **overrides)
    run = build_run(cfg, get_plugin_manager(load_entry_points=False), Reporter(), None)
    torch.manual_seed(123)
    with torch.no_grad():  # LoRA B starts at zero: move the student off the teacher, so every weight gets a gradient
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return run


def completions(run, n=8, seed=0):
    """Completions of 2-6 tokens; every third one cut off (no EOS), so ``mask_truncated`` empties it."""
    gen = torch.Generator().manual_seed(seed)
    eos = run.tokenizer.eos_token_id
    out = []
    for i in range(n):
        ids = torch.randint(10, len(run.tokenizer) - 1, (2 + i % 5,), generator=gen).tolist()
        out.append(Completion(ids, truncated=True) if i % 3 == 2 else Completion(ids + [eos], truncated=False))
    return out


def gradients(run):
    return [p.grad.detach().clone() for p in run.model.parameters() if p.requires_grad]


def assert_same(updates, reference, tol=1e-5):
    for a, b in zip(updates, reference, strict=True):
        assert b.norm() > 0
        assert ((a - b).norm() / b.norm()).item() <= tol


class Recorder:
    """A component that records each micro-batch's divergence and mask and changes nothing."""

    name = "recorder"

    def __init__(self):
        self.divs, self.masks = [], []

    def transform_divergence(self, div, batch):
        self.divs.append(div.detach().double().clone())
        self.masks.append(batch.step_masks[batch.micro_index].double().clone())
        return div


# ----------------------------------------------------------------------------------------------
# loss_reduction


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_each_reduction_is_invariant_to_the_micro_batch_split(tiny_llama, toy_data, mode, mask_truncated):
    results = []
    for batch_size in (8, 2, 1):
        run = make_run(tiny_llama, toy_data, batch_size=batch_size, grad_accum=8 // batch_size,
                       loss_reduction=mode, mask_truncated=mask_truncated)
        stats = distill_step(run, run.examples[:8], completions(run))
        results.append((stats, gradients(run)))
    (s0, g0) = results[0]
    for stats, grads in results[1:]:
        assert stats["loss"] == pytest.approx(s0["loss"], rel=1e-5)
        assert_same(grads, g0)


def test_sequence_reduction_matches_a_float64_reference_on_random_inputs():
    """Per-token terms of a step split over micro-batches, reduced by the loop's helpers in float32,
    against the per-sequence mean, then mean over sequences, written out in float64."""
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 0, 3, 12, 1, 5, 0, 9, 4, 12]  # two rows without a loss token
    mask = torch.zeros(10, 12)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1.0
    div = torch.rand(10, 12, generator=gen, dtype=torch.float64) * 5
    weight = torch.rand(10, 12, generator=gen, dtype=torch.float64)
    per_sequence = [(div[b, :n] * weight[b, :n]).sum() / n for b, n in enumerate(lengths) if n]
    reference = sum(per_sequence) / len(per_sequence)
    for split in ([10], [3, 3, 4], [1] * 10):
        bounds = torch.tensor([0, *split]).cumsum(0).tolist()
        masks = [mask[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)]
        denominator = reduction.step_denominator(masks, "sequence")
        assert denominator == 8
        total = sum(
            (div[lo:hi].float() * weight[lo:hi].float() * reduction.token_factors(m, "sequence")).sum()
            for (lo, hi), m in zip(zip(bounds, bounds[1:], strict=False), masks, strict=True)
        ) / denominator
        assert abs(float(total) - float(reference)) / float(reference) <= 1e-6


def test_sequence_reduction_in_the_loop_is_the_mean_of_per_sequence_means(tiny_llama, toy_data):
    run = make_run(tiny_llama, toy_data, batch_size=3, grad_accum=3, loss_reduction="sequence", mask_truncated=True)
    recorder = Recorder()
    run.components.append(recorder)
    stats = distill_step(run, run.examples[:8], completions(run))
    rows = [(div[b] * mask[b]).sum() / mask[b].sum()
            for div, mask in zip(recorder.divs, recorder.masks, strict=True) for b in range(len(mask))
            if mask[b].sum() > 0]
    assert len(rows) == 6  # rows 2 and 5 are cut off and masked
    assert stats["loss"] == pytest.approx(float(sum(rows) / len(rows)), rel=1e-6)


def test_sequence_reduction_gradient_equals_token_reduction_with_per_sequence_weights(tiny_llama, toy_data):
    """Sequence reduction = token reduction with weight N / (n_b·S) on sequence b's tokens (N loss
    tokens, n_b of sequence b, S sequences): an independent check of the loop's gradient."""
    sequence = make_run(tiny_llama, toy_data, batch_size=4, grad_accum=2, loss_reduction="sequence")
    comps = completions(sequence)
    distill_step(sequence, sequence.examples[:8], comps)

    class PerSequence:
        name = "per-sequence"

        def token_weights(self, scores, batch):
            lengths = scores.mask.sum(-1, keepdim=True)
            sequences = sum(int((m.sum(-1) > 0).sum()) for m in batch.step_masks)
            return (batch.num_tokens / (lengths.clamp(min=1) * sequences)).expand_as(scores.mask)

    token = make_run(tiny_llama, toy_data, batch_size=4, grad_accum=2, loss_reduction="token")
    token.components.append(PerSequence())
    distill_step(token, token.examples[:8], comps)
    assert_same(gradients(sequence), gradients(token))


def test_the_sequence_count_is_summed_over_processes(tiny_llama, toy_data, monkeypatch):
    """With a second process contributing as many sequences (faked), the same local loss is halved."""
    alone = make_run(tiny_llama, toy_data, batch_size=4, grad_accum=2, loss_reduction="sequence")
    comps = completions(alone)
    one = distill_step(alone, alone.examples[:8], comps)
    monkeypatch.setattr(distributed, "sum_scalar", lambda value: 2.0 * value)
    paired = make_run(tiny_llama, toy_data, batch_size=4, grad_accum=2, loss_reduction="sequence")
    two = distill_step(paired, paired.examples[:8], comps)
    assert two["loss"] == pytest.approx(one["loss"] / 2, rel=1e-6)
    for a, b in zip(gradients(paired), gradients(alone), strict=True):
        torch.testing.assert_close(a, b / 2, rtol=1e-5, atol=1e-9)


def test_unknown_settings_are_config_errors():
    with pytest.raises(ConfigError, match="loss_reduction"):
        RunConfig(loss_reduction="batch").validate()
    with pytest.raises(ConfigError, match="gjsd_scale"):
        RunConfig(gjsd_scale="paper").validate()
    with pytest.raises(UsageError, match="loss_reduction"):
        reduction.token_factors(torch.ones(1, 2), "batch")


# ----------------------------------------------------------------------------------------------
# gjsd_scale, through the loop


def test_research_gjsd_scale_is_the_normalized_loss_times_alpha_one_minus_alpha(tiny_llama, toy_data):
    runs = {}
    for scale in ("normalized", "research"):
        run = make_run(tiny_llama, toy_data, batch_size=4, grad_accum=1, alpha=0.5, gjsd_scale=scale)
        runs[scale] = (distill_step(run, run.examples[:4], completions(run, 4)), gradients(run))
    (norm_stats, norm_grads), (res_stats, res_grads) = runs["normalized"], runs["research"]
    assert res_stats["loss"] > 0
    assert norm_stats["loss"] == pytest.approx(4 * res_stats["loss"], rel=1e-5)  # 1 / (0.5 · 0.5)
    assert_same([4 * g for g in res_grads], norm_grads)

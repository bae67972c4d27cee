"""The divergence against an independent float64 reference written from the definitions."""

import math
import re

import pytest
import torch

from unisd.divergence.losses import generalized_jsd, token_outputs


def reference_divergence(student_logits, teacher_logits, alpha, temperature):
    """Straight from the definitions, in float64, with probabilities (not log-space tricks)."""
    q = torch.softmax(student_logits.double() / temperature, -1)  # student
    p = torch.softmax(teacher_logits.double() / temperature, -1)  # teacher
    if alpha == 0:
        return (p * (p.log() - q.log())).sum(-1)
    if alpha == 1:
        return (q * (q.log() - p.log())).sum(-1)
    m = alpha * p + (1 - alpha) * q
    jsd = alpha * (p * (p.log() - m.log())).sum(-1) + (1 - alpha) * (q * (q.log() - m.log())).sum(-1)
    return jsd / (alpha * (1 - alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_divergence_matches_float64_reference(alpha, temperature):
    gen = torch.Generator().manual_seed(int(alpha * 100 + temperature * 10))
    s = torch.randn(6, 5, 50, generator=gen) * 3
    t = torch.randn(6, 5, 50, generator=gen) * 3
    ours = generalized_jsd(s.float(), t.float(), alpha, temperature)
    ref = reference_divergence(s, t, alpha, temperature)
    assert ours.dtype == torch.float32
    rel = ((ours.double() - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
    assert rel <= 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_gradients_match_autograd_of_float64_reference(alpha):
    gen = torch.Generator().manual_seed(7)
    s = torch.randn(4, 3, 40, generator=gen) * 2
    t = torch.randn(4, 3, 40, generator=gen) * 2
    weights = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    s32 = s.clone().float().requires_grad_(True)
    (generalized_jsd(s32, t.float(), alpha, 0.7) * weights.float()).sum().backward()
    s64 = s.clone().double().requires_grad_(True)
    (reference_divergence(s64, t, alpha, 0.7) * weights).sum().backward()
    rel = ((s32.grad.double() - s64.grad).norm() / s64.grad.norm()).item()
    assert rel <= 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_identical_student_and_teacher_give_zero_loss_and_gradient(alpha):
    logits = torch.randn(3, 4, 30)
    student = logits.clone().requires_grad_(True)
    div = generalized_jsd(student, logits.clone(), alpha, 0.7)
    div.sum().backward()
    assert div.abs().max().item() < 1e-6
    assert student.grad.abs().max().item() < 1e-6


def test_continuous_at_both_ends():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 64, generator=gen, dtype=torch.float64), torch.randn(8, 64, generator=gen, dtype=torch.float64)
    fkl, rkl = generalized_jsd(s, t, 0.0), generalized_jsd(s, t, 1.0)
    near0, near1 = generalized_jsd(s, t, 1e-6), generalized_jsd(s, t, 1 - 1e-6)
    assert torch.allclose(near0, fkl, rtol=1e-4)
    assert torch.allclose(near1, rkl, rtol=1e-4)
    # and the two ends really are different divergences
    assert not torch.allclose(fkl, rkl, rtol=1e-2)


def test_token_outputs_from_hidden_states_match_logits_path():
    gen = torch.Generator().manual_seed(11)
    b, c, h, v = 3, 5, 8, 20
    hs, ht = torch.randn(b, c, h, generator=gen), torch.randn(b, c, h, generator=gen)
    ws, wt = torch.randn(v, h, generator=gen), torch.randn(v, h, generator=gen)
    targets = torch.randint(0, v, (b, c), generator=gen)
    mask = torch.ones(b, c)
    mask[1, 3:] = 0
    mask[2] = 0
    out = token_outputs(hs, ws, ht, wt, targets, mask, alpha=0.5, temperature=0.7)
    ref = reference_divergence(hs.double() @ ws.double().T, ht.double() @ wt.double().T, 0.5, 0.7)
    assert torch.allclose(out.divergence.double(), ref * mask, rtol=1e-5, atol=1e-7)
    logp = torch.log_softmax((hs.double() @ ws.double().T) / 0.7, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out.student_logp.double(), logp * mask, rtol=1e-5, atol=1e-6)
    assert (out.divergence[mask == 0] == 0).all()
    assert math.isclose(float(out.entropy[2].abs().sum()), 0.0)


# ----------------------------------------------------------------------------------------------
# gjsd_scale = "research": the unscaled JSD the research code optimises (issue 13, item 9)


def research_reference(student_logits, teacher_logits, alpha, temperature):
    """The research code's per-token loss from the definitions, float64: plain KLs at the ends, the
    *unscaled* generalized JSD in between (α·KL(p‖m) + (1−α)·KL(q‖m), m = αp + (1−α)q)."""
    q = torch.softmax(student_logits.double() / temperature, -1)
    p = torch.softmax(teacher_logits.double() / temperature, -1)
    if alpha in (0, 1):
        return reference_divergence(student_logits, teacher_logits, alpha, temperature)
    m = alpha * p + (1 - alpha) * q
    return alpha * (p * (p / m).log()).sum(-1) + (1 - alpha) * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_research_scale_matches_float64_reference_values_and_gradients(alpha):
    gen = torch.Generator().manual_seed(17)
    s = torch.randn(5, 4, 60, generator=gen) * 2.5
    t = torch.randn(5, 4, 60, generator=gen) * 2.5
    weights = torch.rand(5, 4, generator=gen, dtype=torch.float64)
    s32 = s.clone().requires_grad_(True)
    ours = generalized_jsd(s32, t, alpha, 0.7, scale="research")
    (ours * weights.float()).sum().backward()
    s64 = s.clone().double().requires_grad_(True)
    ref = research_reference(s64, t, alpha, 0.7)
    (ref * weights).sum().backward()
    assert ((ours.double() - ref).abs() / ref.abs().clamp_min(1e-12)).max().item() <= 1e-5
    assert ((s32.grad.double() - s64.grad).norm() / s64.grad.norm()).item() <= 1e-5


def test_normalized_is_the_research_value_over_alpha_one_minus_alpha():
    gen = torch.Generator().manual_seed(18)
    s, t = torch.randn(6, 40, generator=gen, dtype=torch.float64), torch.randn(6, 40, generator=gen, dtype=torch.float64)
    for alpha in (0.2, 0.5):
        research = generalized_jsd(s, t, alpha, scale="research")
        assert torch.allclose(generalized_jsd(s, t, alpha), research / (alpha * (1 - alpha)), rtol=1e-12)
    assert torch.allclose(generalized_jsd(s, t, 0.5), 4 * generalized_jsd(s, t, 0.5, scale="research"), rtol=1e-12)
    for alpha in (0.0, 1.0):  # the ends are the plain KLs under both scales
        assert torch.equal(generalized_jsd(s, t, alpha, scale="research"), generalized_jsd(s, t, alpha))


def test_unknown_gjsd_scale_is_a_usage_error():
    from unisd.errors import UsageError

    with pytest.raises(UsageError, match="gjsd_scale"):
        generalized_jsd(torch.zeros(1, 3), torch.zeros(1, 3), alpha=0.5, scale="paper")


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_one_alpha_rule_for_the_config_the_oracle_and_the_chunked_path(alpha):
    from unisd.config import ALPHA_RULE, RunConfig
    from unisd.divergence.chunked import chunked_token_outputs
    from unisd.errors import UsageError

    logits = torch.randn(2, 5)
    with pytest.raises(UsageError, match="^" + re.escape(ALPHA_RULE)):
        generalized_jsd(logits, logits, alpha)
    hidden, head = torch.randn(1, 2, 4), torch.randn(5, 4)
    with pytest.raises(UsageError, match="alpha must be in"):
        chunked_token_outputs(hidden, head, hidden, head, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                              alpha=alpha)
    with pytest.raises(UsageError, match="alpha must be in"):
        RunConfig(alpha=alpha).validate()

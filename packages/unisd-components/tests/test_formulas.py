"""Hand-computed values for every mechanism's formula (and float64 references on random inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from components_testlib import agree_logp, examples, scores, step_batch

from unisd.components import make_options
from unisd.errors import OptionError, UsageError
from unisd_components.agreement import Agreement
from unisd_components.clip import Clip
from unisd_components.contrastive import Contrastive, hinge
from unisd_components.ema import Ema, ema_update_
from unisd_components.matching import Matching, hidden_mse

# ------------------------------------------------------------------------------------------ agreement

# K=3 contexts, one sequence of 3 tokens: per-token unbiased variances are 0, 1 and 4.
S_TOKEN = torch.tensor([[[-1.0, -1.0, 0.0]], [[-1.0, -2.0, -2.0]], [[-1.0, -3.0, -4.0]]])


def agreement(**values):
    return Agreement(make_options(Agreement, values))


def test_token_weights_hand_computed():
    # quantile 0.5 of d = [0, 1, 4] is 1; d/scale capped at 2 -> [0, 1, 2]; w = 1/(1+d) floored at 0.4.
    comp = agreement(gamma=1.0, quantile=0.5, cap=2.0, floor=0.4, num_contexts=3)
    mask = torch.ones(1, 3)
    logp = agree_logp(S_TOKEN)
    w = comp.token_weights(scores(mask, teacher_logp=logp), step_batch(examples(1), [mask], [logp]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 0.4]]))
    m = comp.metrics()
    assert m["weight_min"] == pytest.approx(0.4) and m["disagreement_max"] == pytest.approx(4.0)
    assert m["scale"] == pytest.approx(1.0)


def test_token_scale_is_a_quantile_over_the_whole_step():
    # A second micro-batch with d = 9, 9 moves the median of the step to 4: the first micro-batch's
    # weights change although its own tokens did not.
    comp = agreement(gamma=1.0, quantile=0.5, num_contexts=3)
    mask1, mask2 = torch.ones(1, 3), torch.ones(1, 2)
    other = torch.tensor([[[0.0, 0.0]], [[3.0, 3.0]], [[6.0, 6.0]]])
    logps = [agree_logp(S_TOKEN), agree_logp(other)]
    w = comp.token_weights(scores(mask1, teacher_logp=logps[0]), step_batch(examples(2), [mask1, mask2], logps))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.8, 0.5]]))  # 1/(1 + [0, 1, 4]/4)


def test_token_weights_ignore_padding_in_the_quantile():
    comp = agreement(gamma=1.0, quantile=0.5, num_contexts=3)
    padded = torch.cat([S_TOKEN, torch.tensor([[[0.0]], [[50.0]], [[100.0]]])], dim=-1)  # a huge padded token
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    logp = agree_logp(padded)
    w = comp.token_weights(scores(mask, teacher_logp=logp), step_batch(examples(1), [mask], [logp]))
    torch.testing.assert_close(w[:, :3], torch.tensor([[1.0, 0.5, 0.2]]))  # scale 1 (not moved by 50²)
    assert w[0, 3] == 1.0


def test_range_stat_and_single_context():
    comp = agreement(gamma=2.0, stat="range", quantile=1.0, num_contexts=3)
    mask = torch.ones(1, 3)
    logp = agree_logp(S_TOKEN)  # ranges 0, 2, 4; scale 4 -> [0, .5, 1] -> 1/(1 + 2·x)
    w = comp.token_weights(scores(mask, teacher_logp=logp), step_batch(examples(1), [mask], [logp]))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 1 / 3]]))
    single = agreement(gamma=5.0, num_contexts=1)  # one context: no disagreement, weight 1 (not NaN)
    logp1 = agree_logp(S_TOKEN[:1])
    w1 = single.token_weights(scores(mask, teacher_logp=logp1), step_batch(examples(1), [mask], [logp1]))
    torch.testing.assert_close(w1, torch.ones(1, 3))


def test_sequence_weights_hand_computed():
    # Row 0: context means -2 and -1 -> population variance 0.25; row 1 (one real token): -2 and -4 -> 1.
    s = torch.tensor([[[-1.0, -3.0], [-2.0, 99.0]], [[-1.0, -1.0], [-4.0, 99.0]]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    comp = agreement(gamma=2.0, level="seq", num_contexts=2)
    logp = agree_logp(s)
    w = comp.token_weights(scores(mask, teacher_logp=logp), step_batch(examples(2), [mask], [logp]))
    expected = torch.tensor([[np.exp(-0.5)] * 2, [np.exp(-2.0), 1.0]], dtype=torch.float32)
    torch.testing.assert_close(w, expected)
    assert comp.metrics()["disagreement_max"] == pytest.approx(1.0)


def test_token_weights_match_a_float64_reference_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    s = -torch.rand(4, 3, 7, generator=gen, dtype=torch.float64) * 5
    mask = (torch.rand(3, 7, generator=gen) > 0.3).double()
    gamma, q, cap, floor = 3.0, 0.9, 1.5, 0.2
    comp = agreement(gamma=gamma, quantile=q, cap=cap, floor=floor, num_contexts=4)
    logp = agree_logp(s)
    w = comp.token_weights(scores(mask, teacher_logp=logp), step_batch(examples(3), [mask], [logp]))
    a = s.numpy()
    d = a.var(axis=0, ddof=1)
    scale = max(np.quantile(d[mask.numpy() > 0], q), 1e-6)
    ref = np.maximum(1.0 / (1.0 + gamma * np.minimum(d / scale, cap)), floor)
    ref = np.where(mask.numpy() > 0, ref, 1.0)
    np.testing.assert_allclose(w.double().numpy(), ref, rtol=1e-5)


def test_agreement_option_validation():
    with pytest.raises(OptionError, match="quantile"):
        make_options(Agreement, {"quantile": "1.5"})
    with pytest.raises(OptionError, match="not one of"):
        make_options(Agreement, {"builder": "psychic"})


# ---------------------------------------------------------------------------------------- contrastive

S = [-1.0, -1.0, -1.0, -2.0]
G = [-1.2, -0.5, -2.0, -1.0]
B = [-0.8, -3.0, -1.4, -2.5]
# margin 0.5: 0.5+0.2-0.2=0.5 | 0.5+0.5-2<0 -> 0 | 0.5+1-0.4=1.1 | 0.5+1-0.5=1.0
HINGE = [0.5, 0.0, 1.1, 1.0]
# d/ds = sign(s-g) - sign(s-b) where active: +1-(-1)=2 | 0 | +1-(+1)=0 | -1-(+1)=-2
HINGE_GRAD = [2.0, 0.0, 0.0, -2.0]


def test_hinge_values_and_gradients_hand_computed():
    s = torch.tensor(S, dtype=torch.float64, requires_grad=True)
    c = hinge(s, torch.tensor(G, dtype=torch.float64), torch.tensor(B, dtype=torch.float64), 0.5)
    torch.testing.assert_close(c, torch.tensor(HINGE, dtype=torch.float64))
    c.sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor(HINGE_GRAD, dtype=torch.float64))


def test_contrastive_extra_loss_is_weighted_and_zero_without_a_negative():
    comp = Contrastive(make_options(Contrastive, {"weight": 0.1, "margin": 0.5}))
    exs = examples(2)
    comp.attach(exs, {"ex-0": [{"reference": "WRONG"}]})  # ex-1 has none
    assert comp.missing == ["ex-1"]
    s = torch.tensor([S, S], requires_grad=True)
    mask = torch.ones(2, 4)
    sc = scores(mask, student_logp=s, teacher_logp={"main": torch.tensor([G, G]), "negative": torch.tensor([B, B])})
    loss = comp.extra_losses(sc, step_batch(exs, [mask], []))["contrastive"]
    torch.testing.assert_close(loss, torch.tensor([[0.1 * h for h in HINGE], [0.0] * 4]))
    loss.sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.1 * g for g in HINGE_GRAD], [0.0] * 4]))
    m = comp.metrics()
    assert m["violation_rate"] == pytest.approx(3 / 4)
    assert m["pos_dist_mean"] == pytest.approx((0.2 + 0.5 + 1.0 + 1.0) / 4)
    assert m["neg_dist_mean"] == pytest.approx((0.2 + 2.0 + 0.4 + 0.5) / 4)
    assert m["missing"] == 1


# ------------------------------------------------------------------------------------------------ EMA

def test_ema_update_arithmetic():
    shadow = torch.tensor([1.0, -2.0])
    ema_update_(shadow, torch.tensor([3.0, 2.0]), 0.9)
    torch.testing.assert_close(shadow, torch.tensor([1.2, -1.6]))  # 0.9·1 + 0.1·3, 0.9·(−2) + 0.1·2
    ema_update_(shadow, torch.tensor([3.0, 2.0]), 0.9)
    torch.testing.assert_close(shadow, torch.tensor([1.38, -1.24]))


def test_ema_updates_only_every_sync_steps():
    class FakeRun:
        step = 0

    comp = Ema(make_options(Ema, {"sync_steps": 2, "beta": 0.5}))
    comp.mode = "lora"
    p = torch.nn.Parameter(torch.tensor([4.0]))
    comp.params, comp.shadow = {"p": p}, {"p": torch.tensor([0.0])}
    run = FakeRun()
    seen, acted = [], []
    for step in range(1, 5):
        run.step = step
        comp.on_step_end(run)
        seen.append(float(comp.shadow["p"]))
        acted.append(comp.metrics()["activity"])
    assert seen == [0.0, 2.0, 2.0, 3.0]
    assert acted == [0.0, 1.0, 0.0, 1.0]  # activity: 1 at the steps that updated the teacher
    assert comp.metrics() == {"distance": pytest.approx(1.0), "updates": 2.0, "activity": 1.0}


# ------------------------------------------------------------------------------------------------ clip

DIV = [[0.5, 12.0, 3.0], [20.0, 1.0, 0.0]]
CLIP_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def clip_run(values):
    comp = Clip(make_options(Clip, values))
    div = torch.tensor(DIV, requires_grad=True)
    batch = step_batch(examples(2), [CLIP_MASK], [])
    batch.step_divergence = [div.detach()]  # the loop's no-grad pass over the step (one micro-batch here)
    out = comp.transform_divergence(div, batch)
    out.sum().backward()
    return comp, out, div.grad


def test_static_clip_default_cap_is_10():
    comp, out, grad = clip_run({})
    torch.testing.assert_close(out, torch.tensor([[0.5, 10.0, 3.0], [10.0, 1.0, 0.0]]))
    torch.testing.assert_close(grad, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))  # hard clamp
    assert comp.metrics() == {"fraction": pytest.approx(2 / 5), "cap": 10.0, "activity": pytest.approx(2 / 5)}


def test_quantile_clip_uses_masked_tokens():
    comp, out, grad = clip_run({"quantile": "0.5"})  # median of [0.5, 12, 3, 20, 1] = 3
    torch.testing.assert_close(out, torch.tensor([[0.5, 3.0, 3.0], [3.0, 1.0, 0.0]]))
    assert grad[0, 1] == 0.0 and grad[1, 0] == 0.0 and grad[0, 0] == 1.0
    assert comp.metrics() == {"fraction": pytest.approx(2 / 5), "cap": pytest.approx(3.0),
                              "activity": pytest.approx(2 / 5)}


def test_quantile_clip_cap_is_taken_over_the_whole_step():
    # A second micro-batch of divergences 30, 40 moves the step's median from 3 to 12 (of
    # [0.5, 12, 3, 20, 1, 30, 40]); its padded entry (99) does not count.
    comp = Clip(make_options(Clip, {"quantile": "0.5"}))
    assert comp.needs_step_scores and not Clip(make_options(Clip, {"max_value": "5"})).needs_step_scores
    second, second_mask = torch.tensor([[30.0, 40.0, 99.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    batch = step_batch(examples(2), [CLIP_MASK, second_mask], [])
    batch.step_divergence = [torch.tensor(DIV), second]
    out = comp.transform_divergence(torch.tensor(DIV), batch)
    torch.testing.assert_close(out, torch.tensor([[0.5, 12.0, 3.0], [12.0, 1.0, 0.0]]))
    assert comp.metrics()["cap"] == pytest.approx(12.0)


def test_quantile_clip_without_the_steps_divergences_is_a_usage_error():
    comp = Clip(make_options(Clip, {"quantile": "0.5"}))
    with pytest.raises(UsageError, match="step_divergence"):
        comp.transform_divergence(torch.tensor(DIV), step_batch(examples(2), [CLIP_MASK], []))


def test_clip_options_are_exclusive_and_checked():
    with pytest.raises(OptionError, match="mutually exclusive"):
        make_options(Clip, {"max_value": "5", "quantile": "0.9"})
    with pytest.raises(OptionError, match="quantile"):
        make_options(Clip, {"quantile": "0"})


# -------------------------------------------------------------------------------------------- matching

def test_matching_loss_hand_computed_and_stop_grad():
    h_s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], requires_grad=True)
    h_t = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]], requires_grad=True)
    comp = Matching(make_options(Matching, {"mode": "joint", "weight": "0.1"}))
    mask = torch.ones(1, 2)
    out = comp.extra_losses(scores(mask, student_hidden=h_s, teacher_hidden={"main": h_t}),
                            step_batch(examples(1), [mask], []))["matching"]
    torch.testing.assert_close(out, torch.tensor([[0.05, 0.65]]))  # 0.1 · [(1+0)/2, (4+9)/2]
    out.sum().backward()
    assert h_t.grad is None  # the teacher is stop-grad
    torch.testing.assert_close(h_s.grad, 0.1 * (h_s - h_t).detach())  # d/dh_s of 0.1·mean((h_s−h_t)²) over 2 dims
    assert comp.metrics() == {"loss": pytest.approx(3.5), "activity": pytest.approx(0.35)}  # weight 0.1 · loss
    assert comp.distill_weight == 1.0


def test_matching_repr_replaces_the_divergence():
    comp = Matching(make_options(Matching, {"mode": "repr"}))
    assert comp.distill_weight == 0.0
    gen = torch.Generator().manual_seed(1)
    h_s, h_t = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64), torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 3)
    out = comp.extra_losses(scores(mask, student_hidden=h_s, teacher_hidden={"main": h_t}),
                            step_batch(examples(2), [mask], []))["matching"]
    torch.testing.assert_close(out, ((h_s - h_t) ** 2).mean(-1))  # unweighted in repr mode
    torch.testing.assert_close(hidden_mse(h_s, h_t), out)

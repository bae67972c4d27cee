"""The loss of one optimiser step: micro-batch invariance, masks, teacher prompts and forwards."""

import copy

import pytest
import torch

from unisd.config import RunConfig
from unisd.data.prompts import budget_teacher_prompt, render_chat, teacher_text
from unisd.io.reporting import Reporter
from unisd.model.rollout import Completion, split_completion
from unisd.model.scoring import completion_hidden, lm_head_weight, pack
from unisd.plugins import get_plugin_manager
from unisd.run import build_run
from unisd.step import distill_step
from unisd.testing import make_tiny_model, make_tokenizer


def make_run(model_dir, data, **overrides):
    cfg = RunConfig(model=str(model_dir), data=str(data), lora_dropout=0.0, max_new_tokens=8, **overrides)
    return build_run(cfg, get_plugin_manager(load_entry_points=False), Reporter(), None)


def fixed_completions(run, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    eos = run.tokenizer.eos_token_id
    out = []
    for i in range(n):
        length = 2 + i % 5
        ids = torch.randint(10, len(run.tokenizer) - 1, (length,), generator=gen).tolist()
        if i % 3 != 2:
            out.append(Completion(ids + [eos], truncated=False))
        else:
            out.append(Completion(ids, truncated=True))
    return out


@pytest.mark.parametrize("lora", [True, False])
def test_update_does_not_depend_on_micro_batch_split(tiny_llama, toy_data, lora):
    """Same 8 examples and completions as 1×8, 2×4 and 8×1 micro-batches give the same update.

    The update compared is the optimiser-agnostic one, the accumulated gradient (an SGD step is
    -lr times it; differencing fp32 parameters would only add round-off). AdamW's
    first step divides each entry by its own magnitude, which turns float round-off on near-zero
    entries into visible differences; that is the optimiser, not the loss.
    """
    results = []
    for batch_size in (8, 4, 1):
        run = make_run(tiny_llama, toy_data, batch_size=batch_size, grad_accum=8 // batch_size, lora=lora)
        torch.manual_seed(123)
        with torch.no_grad():  # move the student away from the teacher so the loss is far from 0
            for name, p in run.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # LoRA: B starts at zero; make every LoRA weight get a gradient
                elif not lora and p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        stats = distill_step(run, run.examples[:8], fixed_completions(run, 8))
        updates = [p.grad.detach().clone() for p in run.model.parameters() if p.requires_grad]
        results.append((stats, updates))
    (s0, u0) = results[0]
    assert s0["loss"] > 0
    for stats, updates in results[1:]:
        assert stats["loss"] == pytest.approx(s0["loss"], rel=1e-5)
        assert stats["loss_tokens"] == s0["loss_tokens"]
        for a, b in zip(updates, u0, strict=True):
            assert b.norm() > 0
            assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_eos_stays_in_loss_mask_when_pad_equals_eos():
    tok = make_tokenizer(pad_is_eos=True)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos
    packed = pack([[5, 6, 7], [5]], [[9, 10, eos], [11, eos]], pad_id=eos)
    assert packed.mask.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    assert packed.targets[0, 2].item() == eos and packed.targets[1, 1].item() == eos
    # position t's hidden state predicts completion token t
    assert packed.positions.tolist()[0] == [2, 3, 4] and packed.positions.tolist()[1][:2] == [0, 1]


def test_split_completion_keeps_first_eos_and_flags_truncation():
    assert split_completion([4, 5, 2, 2, 2], {2}, 2) == Completion([4, 5, 2], False)
    assert split_completion([4, 5, 6], {2}, 2) == Completion([4, 5, 6], True)
    assert split_completion([4, 3, 3], {2}, 3) == Completion([4], True)  # pad != eos: trailing pad dropped


def test_truncated_completions_can_be_masked(tiny_llama, toy_data):
    run = make_run(tiny_llama, toy_data, batch_size=4, grad_accum=1, mask_truncated=True)
    completions = fixed_completions(run, 4)
    kept = sum(len(c.ids) for c in completions if not c.truncated)
    assert distill_step(run, run.examples[:4], completions)["loss_tokens"] == kept


def test_completion_hidden_states_reproduce_model_logits():
    tok = make_tokenizer()
    model = make_tiny_model(tok)
    model.eval()
    packed = pack([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]], tok.pad_token_id)
    hidden = completion_hidden(model, packed)  # [B, C, H]
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    expected = logits.gather(1, packed.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    ours = hidden @ lm_head_weight(model).T
    assert torch.allclose(ours[packed.mask > 0], expected[packed.mask > 0], atol=1e-5)


def test_teacher_prompt_budget_cuts_the_reference_not_the_problem():
    tok = make_tokenizer()
    problem = "What is 12 + 34? Reply with only the number."
    reference = "46 because " + "twelve and thirty four " * 200

    def build(ref):
        return teacher_text(problem, ref)

    full = len(tok(render_chat(tok, build(reference)), add_special_tokens=False)["input_ids"])
    budget = 120
    assert full > 4 * budget
    out = budget_teacher_prompt(tok, build, reference, budget)
    assert out.reference_truncated and not out.over_budget
    assert len(out.ids) <= budget
    decoded = tok.decode(out.ids)
    assert problem in decoded
    assert "Carefully study the reference solution" in decoded
    assert "46 because" in decoded and "[...]" in decoded
    short = budget_teacher_prompt(tok, build, "46", budget)
    assert not short.reference_truncated and "46" in tok.decode(short.ids)


def test_run_counts_truncated_references(tiny_llama, toy_data):
    run = make_run(tiny_llama, toy_data, max_teacher_prompt_tokens=160)
    long = copy.copy(run.examples[0])
    long.id, long.reference = "long", "x " * 500
    ids = run.teacher_ids(long)
    assert len(ids) <= 160 and run.reference_truncations == 1
    assert "What is 10 + 20?" in run.tokenizer.decode(ids)


def test_loop_uses_the_chunked_divergence_by_default(tiny_llama, toy_data, monkeypatch):
    import unisd.step as step

    calls = []
    real = step.chunked_token_outputs

    def spy(*args, **kwargs):
        calls.append(kwargs["chunk_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "chunked_token_outputs", spy)
    run = make_run(tiny_llama, toy_data, batch_size=2, grad_accum=2)
    distill_step(run, run.examples[:4], fixed_completions(run, 4))
    assert calls == [1024, 1024]  # one call per micro-batch, default chunk size


def test_micro_batch_with_every_completion_masked_does_not_crash(tiny_llama, toy_data):
    run = make_run(tiny_llama, toy_data, batch_size=2, grad_accum=1, mask_truncated=True)
    completions = [Completion([20, 21], truncated=True), Completion([22, 23], truncated=True)]
    stats = distill_step(run, run.examples[:2], completions)
    assert stats["loss_tokens"] == 0 and stats["loss"] == 0.0


def test_gradient_checkpointing_gives_the_same_gradient(tiny_llama, toy_data):
    grads = []
    for checkpointing in (False, True):
        run = make_run(tiny_llama, toy_data, batch_size=4, grad_accum=1, gradient_checkpointing=checkpointing)
        torch.manual_seed(5)
        with torch.no_grad():
            for name, p in run.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        distill_step(run, run.examples[:4], fixed_completions(run, 4))
        grads.append([p.grad.clone() for p in run.model.parameters() if p.requires_grad])
    assert run.model.is_gradient_checkpointing
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_completion_hidden_under_lora_matches_logits_with_and_without_adapter():
    from unisd.model.models import apply_lora

    tok = make_tokenizer()
    model = apply_lora(make_tiny_model(tok), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    packed = pack([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]], tok.pad_token_id)
    select = packed.mask > 0

    def both():
        hidden = completion_hidden(model, packed)
        logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
        expected = logits.gather(1, packed.positions.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return (hidden @ lm_head_weight(model).T)[select], expected[select]

    with_adapter = both()
    with model.disable_adapter():
        without_adapter = both()
    for ours, expected in (with_adapter, without_adapter):
        assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(with_adapter[0], without_adapter[0], atol=1e-3)  # the adapter really acts

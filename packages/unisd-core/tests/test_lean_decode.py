"""The lean decoding loop (unisd.model.lean_decode) against transformers' own forward and ``generate``."""

from __future__ import annotations

import pytest
import torch

from unisd.model import lean_decode
from unisd.model.merged_adapter import adapter_merged
from unisd.model.rollout import HFBackend, SamplingParams
from unisd.testing import make_tiny_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _model(tokenizer, arch="llama", kv_heads=2, dtype=torch.float64, seed=0):
    model = make_tiny_model(tokenizer, arch=arch, seed=seed)
    if kv_heads != model.config.num_key_value_heads:  # rebuild with the other head grouping
        from transformers import AutoModelForCausalLM

        config = model.config
        config.num_key_value_heads = kv_heads
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    # larger weights than a fresh model's 0.02: attention and sampling then depend on every part of the
    # forward (a fresh tiny model attends almost uniformly); Qwen2's q/k/v biases get values too
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
    return model.to(dtype).eval()


def _prompts(seed=0, n=5, shared=0):
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(5, 300, (shared,), generator=gen).tolist()
    return [head + torch.randint(5, 300, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def _generate(model, tokenizer, prompts, lean, monkeypatch, temperature=1.0, top_p=1.0, seed=0, max_new=8,
              merge="auto", expect_loop=None):
    """Completions with the lean loop on or off; checks that it ran exactly when expected (default: when on)."""
    monkeypatch.setenv("UNISD_LEAN_DECODING", "1" if lean else "0")
    calls = []
    monkeypatch.setattr(lean_decode, "decode", lambda *a, **k: calls.append(1) or _REAL_DECODE(*a, **k))
    torch.manual_seed(seed)
    backend = HFBackend(model, tokenizer, batch_size=16, merge_adapter=merge)
    out = backend.generate(prompts, SamplingParams(temperature, top_p, max_new))
    assert bool(calls) == (lean if expect_loop is None else expect_loop)
    return [(c.ids, c.truncated) for c in out]


_REAL_DECODE = lean_decode.decode


@pytest.mark.parametrize("arch,kv_heads", [("llama", 2), ("llama", 4), ("qwen2", 2)])
def test_step_logits_equal_the_models_forward(tokenizer, arch, kv_heads):
    """Each decoding step's logits against the model's own forward over the whole left-padded sequence
    (float64; the model's RMSNorm itself rounds through float32, so agreement is to float32 precision)."""
    model = _model(tokenizer, arch, kv_heads)
    body = lean_decode.lean_body(model)
    assert body is not None
    gen = torch.Generator().manual_seed(1)
    b, width, steps = 3, 6, 4
    ids = torch.randint(5, 300, (b, width + steps), generator=gen)
    mask = torch.ones(b, width + steps, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        prefill = model.model(input_ids=ids[:, : width - 1], attention_mask=mask[:, : width - 1],
                              position_ids=positions[:, : width - 1], use_cache=True)
        cache = prefill.past_key_values if getattr(prefill, "cache", None) is None else prefill.cache
        keys = [torch.zeros(b, body.kv_heads, width + steps, body.head_dim, dtype=torch.float64) for _ in body.layers]
        values = [torch.zeros_like(k) for k in keys]
        for i, layer in enumerate(cache.layers):
            keys[i][:, :, : width - 1], values[i][:, :, : width - 1] = layer.keys, layer.values
        for t in range(steps):
            column = width - 1 + t
            got = body.step(ids[:, column], positions[:, column], keys, values, column, mask[:, : column + 1].bool())
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), full[:, column], rtol=1e-5, atol=1e-5)


def _multinomial_draws(monkeypatch):
    """The loop's sampler replaced by generate's own draw (same scores, ``torch.multinomial``), so that sampled
    completions can be compared with generate's token for token."""
    def draw(logits, temperature, top_p):
        if temperature <= 0:
            return logits.argmax(-1)
        probs = lean_decode.sampling_scores(logits, temperature, top_p).softmax(-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    monkeypatch.setattr(lean_decode, "next_tokens", draw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.8)])
def test_generation_equals_generate(tokenizer, monkeypatch, arch, temperature, top_p):
    """Same completions (tokens, EOS cut, truncation) as transformers' generate from the same seed, greedy, and
    sampled with generate's draw (the loop's own sampler is tested on its own); some rows stop early on an EOS
    (a token the first row generates is made a second EOS id)."""
    _multinomial_draws(monkeypatch)
    model = _model(tokenizer, arch)
    prompts = _prompts(seed=2, n=6)
    first = _generate(model, tokenizer, prompts, False, monkeypatch, temperature, top_p, seed=4, max_new=10)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first[0][0][2]]
    lean = _generate(model, tokenizer, prompts, True, monkeypatch, temperature, top_p, seed=4, max_new=10)
    plain = _generate(model, tokenizer, prompts, False, monkeypatch, temperature, top_p, seed=4, max_new=10)
    assert lean == plain
    assert any(not truncated for _, truncated in lean) and any(truncated for _, truncated in lean)


@pytest.mark.parametrize("shared,repeats", [(20, 1), (0, 3), (20, 2)])
def test_shared_prefix_and_repeated_prompts(tokenizer, monkeypatch, shared, repeats):
    """Prompts with a common prefix (prefilled once) and G copies of each prompt (prefilled once per distinct
    prompt) continue from those caches as generate does."""
    _multinomial_draws(monkeypatch)
    model = _model(tokenizer)
    prompts = [p for p in _prompts(seed=5, n=4, shared=shared) for _ in range(repeats)]
    lean = _generate(model, tokenizer, prompts, True, monkeypatch, seed=9)
    plain = _generate(model, tokenizer, prompts, False, monkeypatch, seed=9)
    assert lean == plain


def test_one_token_prompts_and_no_new_tokens(tokenizer, monkeypatch):
    _multinomial_draws(monkeypatch)
    model = _model(tokenizer)
    prompts = [[5], [17], [40]]
    assert _generate(model, tokenizer, prompts, True, monkeypatch, seed=1) == \
        _generate(model, tokenizer, prompts, False, monkeypatch, seed=1)
    monkeypatch.setenv("UNISD_LEAN_DECODING", "1")
    out = HFBackend(model, tokenizer).generate(_prompts(n=2), SamplingParams(1.0, 1.0, 0))
    assert [c.ids for c in out] == [[], []]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)])
def test_sampler_draws_each_token_with_its_probability(temperature, top_p):
    """200,000 draws of one row's next token: each token's frequency within 5 standard errors of its
    probability, and tokens top-p removes (or of probability 0) never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf"), -8.0])
    probs = lean_decode.sampling_scores(logits[None].double(), temperature, top_p).softmax(-1)[0]
    n = 200_000
    torch.manual_seed(0)
    draws = lean_decode.next_tokens(logits.expand(n, -1).contiguous(), temperature, top_p)
    counts = torch.bincount(draws, minlength=len(logits)).double()
    assert counts[probs == 0].sum() == 0
    assert (probs == 0).sum() >= (1 if top_p == 1.0 else 3)  # the -inf logit; top-p also drops the tail
    error = (probs * (1 - probs) / n).sqrt()
    assert ((counts / n - probs).abs() <= 5 * error + 1e-12).all(), (counts / n, probs)
    assert torch.equal(lean_decode.next_tokens(logits[None], 0.0, 1.0), torch.tensor([0]))  # greedy


def test_sampling_scores_equal_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    for temperature, top_p in ((0.7, 1.0), (1.0, 0.9), (0.5, 0.3), (2.0, 0.999)):
        expected = TemperatureLogitsWarper(temperature)(None, logits)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = lean_decode.sampling_scores(logits, temperature, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)], rtol=0, atol=0)
        assert (~torch.isinf(got)).sum(-1).min() >= 1


def test_adapters_decide_whether_the_loop_runs(tokenizer, monkeypatch):
    """An active, unmerged LoRA adapter changes each layer's output, so generation goes through generate; merged
    (the default on a CPU) or disabled, the loop runs, and both give generate's completions."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    assert lean_decode.lean_body(model) is None
    with adapter_merged(model):
        assert lean_decode.lean_body(model) is not None
    with model.disable_adapter():
        assert lean_decode.lean_body(model) is not None
    prompts = _prompts(seed=3, n=4)
    _multinomial_draws(monkeypatch)
    for merge in ("on", "off"):
        lean = _generate(model, tokenizer, prompts, True, monkeypatch, merge=merge, expect_loop=merge == "on")
        assert lean == _generate(model, tokenizer, prompts, False, monkeypatch, merge=merge)


def test_unknown_bodies_are_left_to_generate(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4))
    assert lean_decode.lean_body(gpt2) is None
    sliding = _model(tokenizer, "qwen2")
    sliding.config.use_sliding_window, sliding.config.sliding_window = True, 4
    sliding.config.layer_types = ["sliding_attention"] * sliding.config.num_hidden_layers
    assert lean_decode.lean_body(sliding) is None
    half = _model(tokenizer, dtype=torch.bfloat16)
    assert lean_decode.lean_body(half) is None
    eager = _model(tokenizer)
    eager.config._attn_implementation = "flash_attention_2"
    assert lean_decode.lean_body(eager) is None
    assert lean_decode.lean_body(_model(tokenizer, dtype=torch.float32)) is not None


def test_settings_generate_would_honour_keep_generate(tokenizer, monkeypatch):
    """A model whose generation config suppresses tokens, forbids repeats or forces a minimum length keeps
    generate (which honours them); the loop applies only temperature and top-p."""
    prompts = _prompts(seed=6, n=3)
    for name, value in (("suppress_tokens", [5, 6]), ("no_repeat_ngram_size", 2), ("min_new_tokens", 3),
                        ("num_beams", 2)):
        model = _model(tokenizer)
        setattr(model.generation_config, name, value)
        assert lean_decode.lean_body(model) is None, name
    model = _model(tokenizer)
    model.generation_config.suppress_tokens = [5, 6]
    _generate(model, tokenizer, prompts, True, monkeypatch, temperature=0.0, expect_loop=False)
    model.generation_config.suppress_tokens = None
    assert lean_decode.lean_body(model) is not None


def test_subclasses_prompt_learning_and_other_tuners_keep_generate(tokenizer):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):  # a subclass may change the forward (here it could scale the logits)
        pass

    scaled = Scaled(_model(tokenizer).config).double().eval()
    assert lean_decode.lean_body(scaled) is None
    prompt_tuned = get_peft_model(_model(tokenizer), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert lean_decode.lean_body(prompt_tuned) is None
    ia3 = get_peft_model(_model(tokenizer), IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"]))
    with ia3.disable_adapter():
        assert lean_decode.lean_body(ia3) is None  # another tuner type: not read as a plain layer
    lora = get_peft_model(_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj"]))
    lora.merge_adapter()
    assert lean_decode.lean_body(lora) is not None  # merged by PEFT: the base weight holds the update
    with lora.disable_adapter():  # disabled while merged: PEFT unmerges on the next forward, the loop would not
        assert lean_decode.lean_body(lora) is None

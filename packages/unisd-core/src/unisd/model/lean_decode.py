"""Decoding a Llama-family model token by token without transformers' per-token machinery.

A decoding step of SmolLM2-135M for 8 rows on two CPU cores spends about 50 ms in its products and, inside
``generate``, about as long again around them: every step builds masks, position ids and cache objects,
runs the logits processors and calls ~600 modules (adapter wrappers included) through their hooks
(bench/RESULTS.md, "Decoding without transformers' per-token machinery"). :func:`decode` runs the same
arithmetic as the model's own forward for each new token (RMSNorm, the model's own rotary embedding module,
scaled-dot-product attention, the gated MLP, the model's own weights) on key/value buffers allocated once,
and samples as the method does (temperature, top-p; greedy at temperature 0). Its tokens' logits equal
``generate``'s up to float rounding (tested against a float64 forward), and greedy decoding picks the same
tokens. Sampling draws from the same distribution with one uniform number per row and step
(:func:`next_tokens`), not ``generate``'s stream of random numbers, so a seed gives other samples than
``generate`` gives.

Only bodies whose forward is known are taken (:func:`lean_body`): transformers' own Llama and Qwen2 decoder
layers with plain linear layers, or adapter layers that add nothing at the moment (disabled, merged, or
with no active adapter: :func:`~unisd.model.merged_adapter.adapter_merged` leaves LoRA layers so), sdpa
or eager attention without a sliding window, on an unsharded model. Anything else returns None and the
caller uses ``generate``. The prompt's keys and values come from the model's own forward (the caller's
prefill); this module continues from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F

from ..parallel import sharding
from ..switches import switch
from . import onednn
from .scoring import _gap_safe, decoder_of, prompt_learning

# transformers' decoder layers whose forward :class:`LeanBody` repeats: pre-norm attention and gated MLP
# with residuals, rotary embeddings from the body's ``rotary_emb``, no embedding scale, no logit softcap.
_LAYER_CLASSES = {"llama": "LlamaDecoderLayer", "qwen2": "Qwen2DecoderLayer"}
# ... inside exactly these model and body classes (a subclass may change the forward, e.g. scale the logits)
_MODEL_CLASSES = {"llama": ("LlamaForCausalLM", "LlamaModel"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Model")}
# generation settings transformers' generate would honour from the model's own generation config, and their
# neutral values: the loop applies only temperature and top-p, so a model that sets any of these keeps generate
_NEUTRAL_GENERATION = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "min_length": 0, "min_new_tokens": None,
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "min_p": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "guidance_scale": None, "watermarking_config": None, "encoder_no_repeat_ngram_size": 0,
    "diversity_penalty": 0.0, "top_h": None, "assistant_model": None, "prompt_lookup_num_tokens": None,
}


def _plain_generation_config(model: Any) -> bool:
    """Whether the model's generation config asks for nothing beyond the method's sampling (see
    :data:`_NEUTRAL_GENERATION`; top-k and the repetition penalty are always passed explicitly)."""
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, name, neutral) in (None, neutral)
                                 for name, neutral in _NEUTRAL_GENERATION.items())


def _known_classes(model: Any, decoder: Any, model_type: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = _MODEL_CLASSES[model_type]
    return all(type(m).__name__ == name and type(m).__module__.startswith("transformers.models.")
               for m, name in zip((inner, decoder), names, strict=True))


Weights = tuple[torch.Tensor, torch.Tensor | None]  # (weight [out, in], bias [out] or None)


def plain_linear(module: Any) -> bool:
    """Whether ``module`` computes ``x · Wᵀ + b`` and nothing else: ``nn.Linear`` or our oneDNN subclass (other
    subclasses, quantised ones say, compute something else)."""
    return type(module) in (torch.nn.Linear, onednn.OneDnnLinear)


def lora_linear(module: Any) -> bool:
    """Whether ``module`` is PEFT's LoRA ``Linear`` layer (another tuner type may change the output even when
    "disabled")."""
    return type(module).__name__ == "Linear" and type(module).__module__.startswith("peft.tuners.lora")


def _linear_weights(module: Any) -> Weights | None:
    """A linear layer's ``(weight, bias)`` if its output is just ``x · Wᵀ + b``: a plain ``nn.Linear`` (our
    oneDNN subclass included), or a PEFT adapter layer around one whose adapters add nothing now."""
    if hasattr(module, "get_base_layer"):  # a PEFT tuner layer
        if not lora_linear(module):
            return None
        disabled, merged = getattr(module, "disable_adapters", False), getattr(module, "merged", False)
        idle = not any(name in module.lora_A for name in module.active_adapters)
        # disabled, unmerged: the base weight alone; merged, enabled: the base weight holds the update. PEFT
        # unmerges a disabled merged layer on its next forward, which this loop would not do.
        if not ((disabled and not merged) or (merged and not disabled) or (idle and not merged)):
            return None
        module = module.get_base_layer()
    return (module.weight, module.bias) if plain_linear(module) else None


def _rms_weights(module: Any) -> tuple[torch.Tensor, float] | None:
    """An RMSNorm's ``(weight, epsilon)`` for transformers' Llama/Qwen2 RMSNorm, else None."""
    if type(module).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm"):
        return None
    return module.weight, float(module.variance_epsilon)


P = TypeVar("P")  # how a user of :func:`read_layer` holds a projection


@dataclass
class Layer(Generic[P]):
    """One decoder layer's norms (weight, epsilon), projections, activation and attention scale."""

    norm1: tuple[torch.Tensor, float]
    q: P
    k: P
    v: P
    o: P
    norm2: tuple[torch.Tensor, float]
    gate: P
    up: P
    down: P
    act: Any
    scaling: float


def read_layer(layer: Any, projection: Callable[[Any], P | None]) -> Layer[P] | None:
    """A known decoder layer's parts, each projection read by ``projection`` (None: not one it repeats); None
    when a part is missing or unknown, or the layer attends through a sliding window."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return None
    parts = [_rms_weights(layer.input_layernorm), *(projection(getattr(attn, n, None)) for n in
                                                      ("q_proj", "k_proj", "v_proj", "o_proj")),
             _rms_weights(layer.post_attention_layernorm),
             *(projection(getattr(mlp, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))]
    if any(p is None for p in parts) or getattr(attn, "sliding_window", None):
        return None
    return Layer(*parts, act=mlp.act_fn, scaling=float(attn.scaling))


def _rms_norm(x: torch.Tensor, weights: tuple[torch.Tensor, float]) -> torch.Tensor:
    """transformers' Llama RMSNorm: in float32, the weight applied in the input's dtype."""
    weight, eps = weights
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(x: torch.Tensor, weights: Weights) -> torch.Tensor:
    return onednn.linear(x, *weights)


class LeanBody:
    """A supported decoder's weights, read through once per generation (see :func:`lean_body`)."""

    def __init__(self, decoder: Any, layers: list[Layer[Weights]], final_norm: tuple[torch.Tensor, float], head: Weights):
        config = decoder.config
        self.decoder, self.layers, self.final_norm, self.head = decoder, layers, final_norm, head
        self.embedding = decoder.embed_tokens.weight
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)

    def step(self, ids: torch.Tensor, positions: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
             column: int, key_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` (float32) of the token after ``ids`` ``[B]``, which sit at cache column ``column``
        and rotary ``positions`` ``[B]``; writes their keys and values into column ``column`` of ``keys`` and
        ``values`` (``[B, kv heads, columns, head dim]`` per layer). ``key_mask`` ``[B, column + 1]``: which
        columns each row attends to."""
        b = ids.shape[0]
        x = F.embedding(ids[:, None], self.embedding)  # [B, 1, H]
        cos, sin = self.decoder.rotary_emb(x, positions[:, None])
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, 1, head dim]
        mask = key_mask[:, None, None, :]  # [B, 1, 1, columns]
        end = column + 1
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.norm1)
            q = _linear(h, layer.q).view(b, 1, self.heads, self.head_dim).transpose(1, 2)
            k = _linear(h, layer.k).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = _linear(h, layer.v).view(b, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            keys[i][:, :, column : end] = k * cos + _rotate_half(k) * sin
            values[i][:, :, column : end] = v
            a = F.scaled_dot_product_attention(q, keys[i][:, :, :end], values[i][:, :, :end], attn_mask=mask,
                                               scale=layer.scaling, enable_gqa=self.kv_heads != self.heads)
            x = x + _linear(a.transpose(1, 2).reshape(b, 1, self.heads * self.head_dim), layer.o)
            h = _rms_norm(x, layer.norm2)
            x = x + _linear(layer.act(_linear(h, layer.gate)) * _linear(h, layer.up), layer.down)
        x = _rms_norm(x, self.final_norm)
        return _linear(x[:, 0], self.head).to(torch.float32)


def enabled() -> bool:
    """Lean decoding is on: the switch ``UNISD_LEAN_DECODING`` is not off."""
    return switch("UNISD_LEAN_DECODING")


def known_body(model: Any) -> tuple[Any, list[Any], tuple[torch.Tensor, float]] | None:
    """``(decoder, its layers, its final norm's weights)`` when the model's body is one whose forward this
    module and :mod:`~unisd.model.lean_forward` repeat: transformers' own Llama/Qwen2 classes, unsharded,
    without a sliding window, logit softcap, prompt learning or tensor-parallel split, in float32/float64;
    else None. The linear layers are checked by each user (they accept different adapter states)."""
    decoder = decoder_of(model)
    config = getattr(decoder, "config", None)
    expected = _LAYER_CLASSES.get(getattr(config, "model_type", None))
    if expected is None or sharding.is_sharded(model) or not _gap_safe(config):
        return None
    if not _known_classes(model, decoder, config.model_type) or prompt_learning(model):
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "pretraining_tp", 1) != 1:
        return None
    layers = list(getattr(decoder, "layers", []))
    if not layers or any(type(layer).__name__ != expected or not type(layer).__module__.startswith("transformers.")
                         for layer in layers):
        return None
    embed, final_norm = getattr(decoder, "embed_tokens", None), _rms_weights(decoder.norm)
    if type(embed) is not torch.nn.Embedding or final_norm is None:
        return None
    if embed.weight.dtype not in (torch.float32, torch.float64):
        return None  # half-precision models keep transformers' own casts (not repeated or tested here)
    return decoder, layers, final_norm


def lean_body(model: Any) -> LeanBody | None:
    """The model's body as a :class:`LeanBody` if this module knows its forward (see the module docstring),
    else None. Read at the start of each generation: it depends on the adapters' state."""
    known = known_body(model)
    if known is None or not _plain_generation_config(model):
        return None
    decoder, layers, final_norm = known
    parsed = [read_layer(layer, _linear_weights) for layer in layers]
    head = _linear_weights(model.get_output_embeddings())
    if head is None or any(p is None for p in parsed):
        return None
    return LeanBody(decoder, parsed, final_norm, head)


def sampling_scores(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``logits`` ``[B, V]`` at ``temperature``, with every token outside the smallest set whose probability
    reaches ``top_p`` set to -inf (the most likely token always stays), as transformers' temperature and
    top-p warpers compute them."""
    scores = logits / temperature
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The method's choice of each row's next token: greedy at temperature 0, else a draw from
    :func:`sampling_scores`' distribution by inverting its cumulative distribution at one uniform number per
    row (from the global generator). The sum runs in float64, so even the rarest token keeps its probability.
    ``torch.multinomial`` (what ``generate`` uses) draws an exponential number for every vocabulary entry on
    one thread: 9 ms per step for 8 rows of a 49k vocabulary here, against 0.5 ms."""
    if temperature <= 0:
        return logits.argmax(-1)
    cdf = sampling_scores(logits, temperature, top_p).softmax(-1).cumsum(-1, dtype=torch.float64)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    # right=True: token i is drawn for u in [cdf[i-1], cdf[i]), an interval as wide as its probability, so a
    # token of probability 0 never is
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


@torch.no_grad()
def decode(body: LeanBody, last: torch.Tensor, mask: torch.Tensor, cache: Any, temperature: float, top_p: float,
           max_new_tokens: int, pad_id: int, eos: set[int]) -> torch.Tensor:
    """New tokens ``[B, ≤ max_new_tokens]`` after left-padded prompts whose last column ``last`` ``[B]`` is yet
    to run and whose other columns are in ``cache`` (a transformers cache of ``W - 1`` columns, or None when
    ``W`` is 1). ``mask`` ``[B, W]``: the prompts' attention mask. Rows that reached an EOS continue with
    ``pad_id``; decoding stops when every row has, as ``generate`` does."""
    b, width = mask.shape
    device = last.device
    columns = width + max_new_tokens
    dtype = body.embedding.dtype
    keys, values = [], []
    for i in range(len(body.layers)):
        k = torch.zeros(b, body.kv_heads, columns, body.head_dim, dtype=dtype, device=device)
        v = torch.zeros_like(k)
        if cache is not None:
            k[:, :, : width - 1] = cache.layers[i].keys
            v[:, :, : width - 1] = cache.layers[i].values
        keys.append(k)
        values.append(v)
    key_mask = torch.zeros(b, columns, dtype=torch.bool, device=device)
    key_mask[:, :width] = mask.bool()
    key_mask[:, width:] = True
    # rotary positions count each row's real tokens (left padding and a shared prefix's gap are not counted)
    position = mask.long().sum(-1) - 1
    eos_ids = torch.tensor(sorted(eos), device=device)
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    token = last
    for t in range(max_new_tokens):
        column = width - 1 + t
        logits = body.step(token, position + t, keys, values, column, key_mask[:, : column + 1])
        token = torch.where(unfinished, next_tokens(logits, temperature, top_p), pad_id)
        out.append(token)
        unfinished &= ~torch.isin(token, eos_ids)
        if not bool(unfinished.any()):
            break
    return torch.stack(out, 1) if out else torch.zeros(b, 0, dtype=torch.long, device=device)

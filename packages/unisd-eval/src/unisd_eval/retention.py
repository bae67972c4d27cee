"""Retention (unisd-method.md §5.5): how far the trained model moved from its base, on the task's prompts.

"Did the student forget?" as numbers, both directions on greedy completions of the same prompts:

* **forward** — the trained model answers (``y_ft``); per token, the Jensen–Shannon divergence between
  the base's and the trained model's next-token distributions (T = 1), and ``log p_base(y_ft)``. The
  retention perplexity is ``PPL_ret = exp(−mean_t log p_base(y_ft,t))`` per item: how natural the
  base model finds what the trained model now writes.
* **reverse** — the base answers (``y_base``); the same JSD on those positions and ``log p_ft(y_base)``:
  how much of the base's own behaviour the trained model still assigns probability to.

The JSD is ``½KL(p‖m) + ½KL(q‖m)``, ``m = ½(p+q)``, in [0, ln 2], computed by the training loss's
chunked divergence (:func:`unisd.divergence.chunked.chunked_token_outputs` at α = ½, whose JSD is normalised by
α(1−α) = ¼; undone here), so no tokens × vocabulary tensor is built. A model equal to its base gives 0.

Which text: the research code used the evaluation task's prompts (and the models' own completions).
So do we — any registered task, including ``demo`` (built into unisd) and the offline copies shipped in
PyPI packages (HumanEval, GSM8K test, GPQA diamond, CommonsenseQA and MedMCQA dev), so it runs offline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unisd.data.tasks import Example
from unisd.errors import UsageError

RETENTION = "retention"
JSD_ALPHA = 0.5  # the symmetric JSD; chunked_token_outputs divides it by alpha(1-alpha)
JSD_SCALE = JSD_ALPHA * (1.0 - JSD_ALPHA)
PERCENTILES = (10, 25, 50, 75, 90)
DEFAULT_PROMPTS = "demo"  # built into unisd: needs no download


@dataclass
class Direction:
    """Per item: the completion scored, its mean token JSD, the scorer's mean log-prob, its length."""

    completions: list[list[int]]
    jsd: list[float]
    logp: list[float]
    tokens: list[int]


def base_of(model_ref: str, base: str | None) -> str:
    """``--base``, else the base an adapter directory records (``base_model_name_or_path``)."""
    if base:
        return base
    config = Path(model_ref) / "adapter_config.json"
    if config.is_file():
        try:
            recorded = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded:
            return recorded
    raise UsageError(f"--model {model_ref}: give --base BASE (the model it was trained from); only a LoRA "
                     "adapter directory records its base")


def prompts_task_of(model_ref: str, prompts_from: str | None) -> tuple[str, str]:
    """The task whose prompts to use and why: ``--prompts-from``, the run's own task, else the demo."""
    if prompts_from:
        return prompts_from, "--prompts-from"
    config = Path(model_ref).parent / "config.toml"  # RUN/final -> RUN/config.toml
    if config.is_file():
        import tomllib

        try:
            task = tomllib.loads(config.read_text(encoding="utf-8")).get("task")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            task = None
        if isinstance(task, str) and task:
            return task, f"the run's task ({config})"
    return DEFAULT_PROMPTS, "default (built into unisd; give --prompts-from TASK for another)"


def generate_ids(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
                 batch_size: int) -> list[list[int]]:
    """Greedy completion ids (EOS included) for each prompt."""
    from unisd.model.rollout import HFBackend, SamplingParams

    backend = HFBackend(model, tokenizer, batch_size=batch_size)
    return [c.ids for c in backend.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))]


@torch.no_grad()
def score_direction(writer: Any, scorer: Any, prompts: list[list[int]], completions: list[list[int]],
                    pad_id: int, batch_size: int, chunk_size: int = 1024) -> Direction:
    """JSD(writer, scorer) per token on the writer's completions, and the scorer's log-prob of them."""
    from unisd.divergence.chunked import chunked_token_outputs
    from unisd.model.scoring import completion_hidden, lm_head_weight, pack

    out = Direction(completions, [], [], [])
    for start in range(0, len(prompts), batch_size):
        packed = pack(prompts[start : start + batch_size], completions[start : start + batch_size], pad_id)
        hidden_w = completion_hidden(writer, packed)  # [B, C, H]
        hidden_s = completion_hidden(scorer, packed)
        device = hidden_w.device
        scores = chunked_token_outputs(
            hidden_w, lm_head_weight(writer), hidden_s.to(device), lm_head_weight(scorer).to(device),
            packed.targets.to(device), packed.mask.to(device), alpha=JSD_ALPHA, temperature=1.0,
            chunk_size=chunk_size,
        )
        mask = packed.mask.to(device)  # [B, C]
        counts = mask.sum(-1).clamp(min=1)
        out.jsd += ((scores.divergence * JSD_SCALE * mask).sum(-1) / counts).tolist()
        out.logp += ((scores.teacher_logp * mask).sum(-1) / counts).tolist()
        out.tokens += mask.sum(-1).long().tolist()
    return out


def check_same_vocabulary(model: Any, base: Any, model_ref: str, base_ref: str) -> None:
    """Token-level divergences need one vocabulary: a different lm-head size is the wrong --base."""
    from unisd.model.scoring import lm_head_weight

    a, b = lm_head_weight(model).shape[0], lm_head_weight(base).shape[0]
    if a != b:
        raise UsageError(f"--base {base_ref} has a vocabulary of {b} tokens, --model {model_ref} one of {a}: "
                         "retention compares a model with the base it was trained from")


def percentiles(values: list[float]) -> dict[str, float]:
    """p10, p25, median, p75, p90 (linear interpolation)."""
    ordered = torch.tensor(sorted(values), dtype=torch.float64)
    qs = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)
    found = torch.quantile(ordered, qs).tolist()
    return {("median" if p == 50 else f"p{p}"): v for p, v in zip(PERCENTILES, found, strict=True)}


def spread(name: str, values: list[float]) -> dict[str, float]:
    """``name`` (mean), ``name/std`` and its percentiles."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {name: mean, f"{name}/std": std, **{f"{name}/{k}": v for k, v in percentiles(values).items()}}


def summary(forward: Direction, reverse: Direction) -> dict[str, float]:
    """The research code's summary: both JSDs' spread, PPL_ret, log-probs, and paired deltas."""
    ppl = [math.exp(-lp) for lp in forward.logp]
    deltas = [f - r for f, r in zip(forward.jsd, reverse.jsd, strict=True)]
    metrics = {**spread("jsd_forward", forward.jsd), **spread("jsd_reverse", reverse.jsd)}
    metrics["ppl_ret"] = sum(ppl) / len(ppl)
    metrics["ppl_ret/median"] = percentiles(ppl)["median"]
    metrics["logp_base_on_model"] = sum(forward.logp) / len(forward.logp)
    metrics["logp_model_on_base"] = sum(reverse.logp) / len(reverse.logp)
    metrics["jsd_delta"] = sum(deltas) / len(deltas)
    metrics["jsd_delta/median"] = percentiles(deltas)["median"]
    metrics["jsd_delta/win_rate"] = sum(d > 0 for d in deltas) / len(deltas)
    metrics["items"] = len(deltas)
    metrics["tokens_forward"] = sum(forward.tokens)
    metrics["tokens_reverse"] = sum(reverse.tokens)
    return metrics


def records(examples: list[Example], forward: Direction, reverse: Direction, decode: Any) -> list[dict[str, Any]]:
    """One predictions.jsonl record per item: both completions and their numbers."""
    rows = []
    for i, ex in enumerate(examples):
        rows.append({
            "id": ex.id, "prompt": ex.prompt,
            "completion_model": decode(forward.completions[i]), "completion_base": decode(reverse.completions[i]),
            "jsd_forward": forward.jsd[i], "jsd_reverse": reverse.jsd[i],
            "logp_base_on_model": forward.logp[i], "logp_model_on_base": reverse.logp[i],
            "ppl_ret": math.exp(-forward.logp[i]), "tokens_forward": forward.tokens[i],
            "tokens_reverse": reverse.tokens[i],
        })
    return rows


def measure(model: Any, base: Any, tokenizer: Any, examples: list[Example], max_new_tokens: int,
            batch_size: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate with both models, score both directions; returns (summary metrics, per-item records)."""
    from unisd.data.prompts import encode, render_chat

    prompts = [encode(tokenizer, render_chat(tokenizer, ex.prompt)) for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    y_model = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size)
    y_base = generate_ids(base, tokenizer, prompts, max_new_tokens, batch_size)
    forward = score_direction(model, base, prompts, y_model, pad_id, batch_size)
    reverse = score_direction(base, model, prompts, y_base, pad_id, batch_size)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return summary(forward, reverse), records(examples, forward, reverse, decode)

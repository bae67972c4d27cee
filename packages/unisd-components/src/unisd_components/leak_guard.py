"""Leak guard: do not train the student toward copying what only the teacher could see.

The teacher scores the student's completion with the problem *and* the reference in front of it,
inside the method's template. Where the completion copies that context (the template's phrases, "This
is an example for a response to the question:", or a span of the reference), the teacher predicts the
copy with near certainty, because the text is right there in its prompt; the divergence then teaches
the student to produce it without the prompt. Such a leak feeds itself: once sampled, every copied
token is confirmed by the teacher. The trained demo student ended 17 of 48 test answers with the
template this way.

What the guard does: each sampled completion goes through :func:`unisd.evaluation.leakage.detect_leak` (template
prefixes of at least ``min_template_words`` words, ``ngram``-word spans of the reference or template
that the student prompt does not hold). In a completion that leaks, the divergence of the guarded
tokens is multiplied by ``weight`` (0: masked) through ``token_weights``, so it composes with every
other component: weights multiply with agreement's, and clip's transform acts before the weights.
``scope`` picks the guarded tokens:

* ``rest`` (default): from the first leaked token (and the whitespace that opens it) to the end,
  EOS included. Whatever follows a leak is conditioned on text the student should not have written,
  so the teacher's targets there do not transfer to clean completions (after the copied template,
  the teacher continues the template, then the copied reference). The answer *before* the leak is
  still trained, so ``"CLOUD TABLE\\n\\nThis is an example for a"`` keeps teaching "CLOUD TABLE".
* ``span``: only the leaked tokens and the whitespace before them.
* ``completion``: every token of a leaking completion.

Where a leak starts: the hooks see per-token divergences, not the teacher's distribution, and a
single next token ("\\n", "This") cannot be told apart from ordinary text. So at the position where
the student stopped cleanly (EOS), the teacher's probability of going on with the template reaches
the student (under forward KL it is mass to cover), and that is how a leak first gets sampled.
``lookahead`` (tokens, 0: off) checks this where it happens: the teacher, with its own prompt,
greedily continues each completion that ended with EOS (without the EOS) for that many tokens; when
the continuation leaks, the EOS position is guarded too, so the student is not pulled from stopping
toward the copy. It costs one short teacher generation per completion (and, with ``opening``, per
example), all in one ``generate`` call, and is refused under sharding
(the processes would make different numbers of ``generate`` calls). With ``opening`` (off by default)
the teacher also answers each example from its bare prompt for ``lookahead`` tokens; where its own answer
opens with template text (nothing but whitespace or punctuation before it; on the demo, 38 of the 384
held-out items: "This is an example for a response to the question:"), the first position of that
example's completions is guarded too. The guarded 60-step students still answered those very items "This
is an example of a creative solution …", and this was the guess at why; measured, it did not help (two
seeds: leakage 0.22 and 0.14 against 0.10 and 0.13 without it; bench/RESULTS.md), so it stays an
experiment. Other positions are not looked ahead from. Masked tokens stay in the step's loss-token count (the
denominator is fixed before components act, as for agreement's weights), so a masked token lowers
the step's loss rather than re-weighting the others. Extra terms (contrastive, matching) are summed
over the loss mask by the loop and are not weighted by the guard.

Where the reference ends (``stop_weight``): in the teacher's prompt the reference is followed by more
template text, not by the end of a turn. Once a completion has reproduced the reference's ending, the
teacher goes on copying what follows it in its prompt (a blank line, then template phrases or a
paraphrase of them: "CLOUD TABLE\n\nThis is a classic example of …"), and it gives the end of the
turn little probability (0.04 after "CLOUD TABLE" on the demo's SmolLM2, against 0.55 for "\n"). Its
target there is an artefact of the prompt's layout, and the student learns never to stop. With
``stop_weight`` > 0 the guard finds the first position where the completion's text ends with the
reference's ending (:func:`unisd.evaluation.leakage.reference_end_offset`), guards the divergence from
there to the end (whatever follows is conditioned on text after a finished answer), and adds a term
``stop_weight · −log p_student(EOS)`` at that position: the demonstration ends there, so the student
is taught to end its turn where the reference ends. The term is an extra loss (``leak-guard/stop``),
divided by the step's token count like the divergence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from unisd import runtime
from unisd.components import option
from unisd.data.tasks import Example
from unisd.divergence.stepstats import StepSums
from unisd.errors import ConfigError
from unisd.evaluation.leakage import MIN_TEMPLATE_WORDS, NGRAM, detect_leak, reference_end_offset, token_range
from unisd.hookspecs import hookimpl
from unisd.model.rollout import HFBackend, SamplingParams, eos_ids_of
from unisd.model.scoring import lm_head_weight

SCOPES = ("rest", "span", "completion")


class LeakGuard:
    """Mask (or down-weight) the divergence where a sampled completion copies teacher-only text."""

    name: ClassVar[str] = "leak-guard"
    # Not watched: a guard that masks nothing early in a run is working (no leak was sampled yet).
    activity_window: ClassVar[int] = 0

    @dataclass
    class Options:
        weight: float = option(0.0, "Weight of the divergence at guarded tokens: 0 masks them, a value in (0, 1) "
                                    "down-weights them.")
        scope: str = option("rest", "Guarded tokens of a leaking completion: 'rest' (from the leak to the end), "
                                    "'span' (the leaked text only), 'completion' (all of it).", choices=SCOPES)
        min_template_words: int = option(MIN_TEMPLATE_WORDS, "Shortest prefix of a template phrase, in words, that "
                                                             "counts as a leak.")
        ngram: int = option(NGRAM, "Length, in words, of a reference span whose copy counts as a leak.")
        lookahead: int = option(0, "Tokens the teacher greedily continues a completion that ended by itself; when "
                                   "that continuation leaks, the EOS position is guarded too (0: off).")
        opening: bool = option(False, "With lookahead: also let the teacher answer from its bare prompt; where its "
                                      "answer opens with template text, the completion's first position is guarded "
                                      "(experimental: did not lower leakage on the demo, see bench/RESULTS.md).")
        stop_weight: float = option(1.0, "Weight of -log p(EOS) where a completion has just reproduced the reference's "
                                         "ending (the divergence from there on is guarded); 0: off.")

        def __post_init__(self) -> None:
            if not 0.0 <= self.weight < 1.0:
                raise ValueError(f"leak-guard.weight must be in [0, 1), got {self.weight} (1 would guard nothing)")
            if self.min_template_words < 1 or self.ngram < 1:
                raise ValueError("leak-guard.min_template_words and leak-guard.ngram must be >= 1")
            if self.lookahead < 0:
                raise ValueError(f"leak-guard.lookahead must be >= 0, got {self.lookahead}")
            if self.stop_weight < 0:
                raise ValueError(f"leak-guard.stop_weight must be >= 0, got {self.stop_weight}")

    def __init__(self, options: Options | None = None):
        self.options = options or self.Options()
        self.tokenizer: Any = None
        self.task: Any = None
        self.run: Any = None
        # The stop term needs the student's hidden states (its full next-token distribution at one position).
        self.needs_hidden = self.options.stop_weight > 0
        self._eos: list[int] = []
        self._sums = StepSums()  # the step's completions, leaking/started/finished ones, tokens, guarded tokens
        self._ends: tuple[tuple[int, int], list[int | None]] | None = None  # (step, micro) -> reference ends

    def setup(self, run: Any) -> None:
        # The task picks the teacher template whose phrases count as leaks (None: the generic one).
        self.tokenizer, self.task = run.tokenizer, run.task
        self.run = run  # its teacher is read at each step: a component (EMA) may replace it after setup
        self._eos = sorted(eos_ids_of(run.tokenizer, getattr(run, "model", None)))
        for name, value in (("lookahead", self.options.lookahead), ("stop_weight", self.options.stop_weight)):
            if value and runtime.is_sharded(getattr(run, "model", None)):
                raise ConfigError(f"leak-guard.{name} is not supported with sharding (--shard fsdp) yet; "
                                  f"use -o leak-guard.{name}=0")

    def _leak(self, text: str, example: Example) -> Any:
        return detect_leak(text, example, self.task, min_template_words=self.options.min_template_words,
                           ngram=self.options.ngram)

    def guarded_positions(self, example: Example, ids: list[int]) -> list[int]:
        """Token indices of the completion ``ids`` (answering ``example``) whose divergence is guarded."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        leak = self._leak(text, example)
        if not leak.leaked:
            return []
        if self.options.scope == "completion":
            return list(range(len(ids)))

        def decode(t: int) -> str:
            return self.tokenizer.decode(ids[:t], skip_special_tokens=True)

        # The blank line that opens a leak is where the teacher starts copying: it belongs to the leak.
        ranges = [token_range(decode, len(ids), len(text[:start].rstrip()), end) for start, end in leak.spans]
        if self.options.scope == "rest":
            return list(range(ranges[0].start, len(ids)))
        return sorted({t for r in ranges for t in r})

    def reference_end(self, example: Example, ids: list[int]) -> int | None:
        """The first position (token index) of the completion ``ids`` whose preceding text ends with the
        reference's ending, or None: where a completion that reproduced the reference should stop."""
        end = reference_end_offset(self.tokenizer.decode(ids, skip_special_tokens=True), example.reference)
        if end is None:
            return None
        # The tokens that cover the tail's last character end at the position where the answer is finished.
        stop = token_range(lambda t: self.tokenizer.decode(ids[:t], skip_special_tokens=True), len(ids), end - 1, end).stop
        return stop if stop < len(ids) else None  # a tail that ends the completion leaves no position to stop at

    def _reference_ends(self, batch: Any) -> list[int | None]:
        """:meth:`reference_end` of every completion of the micro-batch (computed once per micro-batch:
        ``token_weights`` and ``extra_losses`` both need them)."""
        key = (batch.step, batch.micro_index)
        if self._ends is None or self._ends[0] != key:
            ends = [self.reference_end(ex, list(ids)) for ex, ids in zip(batch.examples, batch.completions, strict=True)]
            self._ends = (key, ends)
        return self._ends[1]

    @torch.no_grad()
    def teacher_continues(self, examples: list[Example], prefixes: list[list[int]]) -> list[str]:
        """The teacher's greedy continuation (``lookahead`` tokens) of each completion prefix from its own prompt,
        decoded with the prefix in front. One ``generate`` call."""
        if not examples:
            return []
        prompts = [self.run.teacher_ids(ex) + list(prefix) for ex, prefix in zip(examples, prefixes, strict=True)]
        with self.run.teacher.as_model() as model:
            backend = HFBackend(model, self.tokenizer, config=getattr(self.run, "config", None))
            continued = backend.generate(prompts, SamplingParams(0.0, 1.0, self.options.lookahead))
        return [self.tokenizer.decode(list(prefix) + list(extra.ids), skip_special_tokens=True)
                for prefix, extra in zip(prefixes, continued, strict=True)]

    def _opens_with_leak(self, text: str, example: Example) -> bool:
        """Does ``text`` open with the template's own words (only whitespace or punctuation before them)?
        A copy of the reference there is the answer itself, whose first-token target is the one to keep."""
        leak = self._leak(text, example)
        return leak.leaked and leak.reason.startswith("template") and not re.search(r"\w", text[: leak.spans[0][0]])

    def _looked_ahead(self, examples: list[Example], completions: list[list[int]],
                      guarded: list[list[int]]) -> tuple[int, int]:
        """The lookahead's guards, added to ``guarded``: the EOS of clean completions the teacher would go on
        copying after, and (``opening``) the first position of completions whose example the teacher itself
        answers with teacher-only text first. Returns how many completions got each."""
        eos = set(self._eos)
        stops = [i for i, ids in enumerate(completions) if not guarded[i] and len(ids) > 1 and ids[-1] in eos]
        firsts: dict[str, list[int]] = {}  # example id -> its completions whose first position is not guarded yet
        if self.options.opening:
            for i, ex in enumerate(examples):
                if 0 not in guarded[i]:
                    firsts.setdefault(ex.id, []).append(i)
        queries = [(examples[i], completions[i][:-1]) for i in stops]
        queries += [(examples[rows[0]], []) for rows in firsts.values()]
        texts = self.teacher_continues([ex for ex, _ in queries], [prefix for _, prefix in queries])
        starts = openings = 0
        for i, text in zip(stops, texts[: len(stops)], strict=True):
            if self._leak(text, examples[i]).leaked:  # the teacher would rather go on copying than stop
                guarded[i] = [len(completions[i]) - 1]  # so its EOS target is left alone
                starts += 1
        for rows, text in zip(firsts.values(), texts[len(stops):], strict=True):
            if self._opens_with_leak(text, examples[rows[0]]):  # its first-token target leans to the template
                for i in (i for i in rows if completions[i]):
                    guarded[i] = sorted({0, *guarded[i]})
                    openings += 1
        return starts, openings

    def token_weights(self, scores: Any, batch: Any) -> torch.Tensor:
        weights = torch.ones_like(scores.mask)  # [B, C]
        completions = [list(ids) for ids in batch.completions]
        guarded = [self.guarded_positions(ex, ids) for ex, ids in zip(batch.examples, completions, strict=True)]
        leaking = sum(bool(positions) for positions in guarded)
        starts = openings = finished = 0
        if self.options.stop_weight > 0:
            for row, end in enumerate(self._reference_ends(batch)):
                if end is not None:  # from the end of the reproduced reference on: guarded, and taught to stop
                    guarded[row] = sorted(set(guarded[row]) | set(range(end, len(completions[row]))))
                    finished += 1
        if self.options.lookahead:
            starts, openings = self._looked_ahead(list(batch.examples), completions, guarded)
        for row, positions in enumerate(guarded):
            if positions:
                weights[row, positions] = self.options.weight
        self._sums.add(batch.step, completions=len(batch.examples), leaking=leaking, starts=starts, finished=finished,
                       openings=openings, tokens=float(scores.mask.sum()), guarded=float(((weights < 1) & (scores.mask > 0)).sum()))
        return weights

    def extra_losses(self, scores: Any, batch: Any) -> dict[str, torch.Tensor]:
        """``stop_weight · −log p_student(EOS)`` at each completion's reference end (0 elsewhere)."""
        if self.options.stop_weight <= 0 or scores.student_hidden is None:
            return {}
        term = torch.zeros_like(scores.divergence)
        ends = [(row, end) for row, end in enumerate(self._reference_ends(batch)) if end is not None]
        if not ends:
            return {"stop": term}
        rows = torch.tensor([r for r, _ in ends], device=term.device)
        cols = torch.tensor([c for _, c in ends], device=term.device)
        hidden = scores.student_hidden[rows, cols]  # [N, H], with grad
        weight = lm_head_weight(self.run.model)
        logits = (hidden.to(torch.float32) @ weight.to(hidden.device, torch.float32).T)  # [N, V]: N positions only
        log_stop = torch.logsumexp(logits[:, self._eos], -1) - torch.logsumexp(logits, -1)
        term = term.index_put((rows, cols), -log_stop.to(term.dtype) * self.options.stop_weight)
        return {"stop": term}

    def metrics(self) -> dict[str, float]:
        """Share of the step's completions that leaked, of its loss tokens that were guarded, and (with
        ``lookahead``) of its clean completions' EOS guarded because the teacher would go on copying, and of
        its completions whose first position was guarded because the teacher's own answer opens with a leak."""
        completions = self._sums["completions"]
        if not completions:
            return {}
        guarded = self._sums["guarded"] / max(self._sums["tokens"], 1.0)
        out = {"leaking_fraction": self._sums["leaking"] / completions, "guarded_fraction": guarded,
               "activity": guarded}
        if self.options.lookahead:
            out["teacher_start_fraction"] = self._sums["starts"] / completions
            if self.options.opening:
                out["teacher_opening_fraction"] = self._sums["openings"] / completions
        if self.options.stop_weight > 0:
            out["reference_end_fraction"] = self._sums["finished"] / completions
        return out


@hookimpl
def register_components(register: Any) -> None:
    """This module is its own plugin (entry point ``leak_guard``)."""
    register(LeakGuard)

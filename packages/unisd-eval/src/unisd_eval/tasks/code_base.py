"""Shared scoring of code tasks: extract the code, run it with its tests in the sandbox, pass@k."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from unisd.data.tasks import Example, Score, Task

from ..metrics import ks_for, mean, mean_pass_at_k
from ..parsing.code import extract_code
from ..sandbox import VERDICTS, Limits, Program, Sandbox

ERROR_CHARS = 500


class CodeTask(Task):
    """A task whose completions are programs checked by executing tests (MBPP, HumanEval).

    ``Score.extracted`` is the code when it came from a JSON object or a fenced block, None when the
    raw text had to be run as is (the extraction-rate denominator). ``Score.verdict`` is the sandbox
    verdict: passed, failed, timeout, crashed or resource-limit.
    """

    max_new_tokens: ClassVar[int] = 1024
    timeout: ClassVar[float] = 10.0  # the method's per-program limit

    def __init__(self, sandbox: Sandbox | None = None):
        self.sandbox = sandbox or Sandbox(Limits(timeout=self.timeout))

    def program(self, example: Example, code: str) -> Program:
        """The extracted solution (untrusted) and the example's tests (run by the sandbox's judge)."""
        raise NotImplementedError

    def score(self, example: Example, completion: str) -> Score:
        return self.score_batch([example], [completion])[0]

    def score_batch(self, examples: list[Example], completions: list[str]) -> list[Score]:
        """Run every completion's program in the sandbox pool (in parallel, bounded)."""
        extracted = [extract_code(c) for c in completions]
        programs = [self.program(ex, code) for ex, (code, _) in zip(examples, extracted, strict=True)]
        results = self.sandbox.run_many(programs)
        scores = []
        for (code, how), result in zip(extracted, results, strict=True):
            error = result.error[:ERROR_CHARS] if result.error else None
            scores.append(Score(1.0 if result.passed else 0.0, code if how != "raw" else None, result.verdict, error))
        return scores

    def aggregate(self, scores: list[Score]) -> dict[str, float]:
        """pass@1 over all completions (also as ``accuracy``), extraction rate and verdict shares."""
        values = [s.value for s in scores]
        out = {"accuracy": mean(values), "pass@1": mean(values),
               "extraction_rate": mean([float(s.extracted is not None) for s in scores])}
        counts = Counter(s.verdict for s in scores)
        for verdict in VERDICTS:
            out[f"verdict/{verdict}"] = counts.get(verdict, 0) / max(len(scores), 1)
        return out

    def summarize(self, examples: list[Example], scores: list[Score]) -> dict[str, float]:
        """Per-problem pass@k (unbiased estimator) when problems have several samples."""
        out = self.aggregate(scores)
        per_problem: dict[str, list[float]] = {}
        for ex, s in zip(examples, scores, strict=True):
            per_problem.setdefault(ex.id, []).append(s.value)
        counts = [(len(v), int(sum(v))) for v in per_problem.values()]
        n_min = min((n for n, _ in counts), default=1)
        for k in ks_for(n_min):
            value = mean_pass_at_k(counts, k)
            if value is not None:
                out[f"pass@{k}"] = value
        out["accuracy"] = out["pass@1"]
        out["problems"] = float(len(per_problem))
        out["samples_per_problem"] = float(n_min)
        return out

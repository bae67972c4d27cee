"""Builders of the agreement component's auxiliary teacher contexts.

Every builder returns, per example id, K context texts. None of them contains the example's own
reference: they are few-shot demonstrations from *other* examples (random, retrieval) or an
instruction induced by the model (induction), followed by the example's *student* text.
"""

from .fewshot import family_of, fewshot_context, induction_context

__all__ = ["family_of", "fewshot_context", "induction_context"]

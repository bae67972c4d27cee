"""GSM8K numeric extraction and normalisation (§5.4)."""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_CUES = re.compile(r"the answer is|final answer is|answer:", re.IGNORECASE)


def extract_number(text: str) -> str | None:
    """The predicted number as written (not normalised), or None when the text has no number.

    Order: the first number after the last ``####``; else the first number after the last of "the
    answer is" / "final answer is" / "answer:" (any case); else the last number in the text.
    """
    if "####" in text:
        found = NUMBER.search(text.rsplit("####", 1)[1])
        if found:
            return found.group(0)
    cues = list(_CUES.finditer(text))
    if cues:
        found = NUMBER.search(text, cues[-1].end())
        if found:
            return found.group(0)
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_number(raw: str) -> str | None:
    """Strip ``,`` ``$`` ``%`` and a trailing period; integers as int strings, else 6 decimals trimmed."""
    cleaned = raw.replace(",", "").replace("$", "").replace("%", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if value == int(value):
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def numbers_match(pred: str | None, gold: str | None) -> bool:
    """Equal normalised strings, or values within 1e-4."""
    if pred is None or gold is None:
        return False
    if pred == gold:
        return True
    try:
        return abs(float(pred) - float(gold)) < 1e-4
    except ValueError:
        return False


def split_gold(answer: str) -> tuple[str, str]:
    """GSM8K ``answer`` field → (chain of thought, gold) split at the last ``####``; commas, ``$`` stripped."""
    cot, _, gold = answer.rpartition("####")
    return cot.strip(), gold.strip().replace(",", "").replace("$", "")

"""Option-letter extraction for multiple-choice answers (§5.2, with the fixes of §7.26).

The research code took the *first* ``Answer:`` line and fell back to the last standalone capital
letter anywhere, which counts the article in "A photon is ..." as an answer. Here the *last* answer
line wins (the prompt asks for the answer on the last line, and models often restate a draft answer
first), a capital "A" followed by a lowercase noun is read as an article, and there is no
"any standalone letter" fallback.
"""

from __future__ import annotations

import re

from .jsonobj import json_object

LETTERS = "ABCDEFGHIJ"


def letters_for(n_choices: int) -> str:
    """The valid letters for ``n_choices`` options: ``ABCD`` for 4."""
    return LETTERS[:n_choices]


def letter_list(n_choices: int) -> str:
    """``A or B``, ``A, B, or C``, ``A, B, C, or D`` — the method's phrasing in the prompt."""
    letters = list(letters_for(n_choices))
    if len(letters) <= 2:
        return " or ".join(letters)
    return ", ".join(letters[:-1]) + ", or " + letters[-1]


def _letter_after(prefix: str, valid: str) -> re.Pattern[str]:
    # The letter may be wrapped in (), [], <>; group 2 is what follows it on the line.
    return re.compile(
        prefix + r"\s*[(\[<]?\s*([" + valid + r"])(?![A-Za-z0-9])(\s*[)\]>]?[^\n]*)",
        re.IGNORECASE | re.MULTILINE,
    )


_CONNECTORS = {"because", "since", "as", "is", "was", "would", "which", "seems", "fits", "matches", "and", "or"}


def _is_article(letter: str, rest: str) -> bool:
    """"A photon …" / "I think …": a capital A or I followed by a lowercase word is prose, not an option.

    "A because …" or "A is correct" still count: the next word is a connector, not a noun.
    """
    word = re.match(r"\s+([a-z]+)", rest)
    return letter in "AI" and word is not None and word.group(1) not in _CONNECTORS


def _clean(text: str) -> str:
    return text.replace("**", "").replace("__", "").replace("`", "")


def extract_letter(text: str, n_choices: int = 4) -> str | None:
    """The answered option letter, or None when the completion states no recognisable answer."""
    valid = letters_for(n_choices)
    text = _clean(text)
    json_letter = _from_json(text, valid)
    if json_letter:
        return json_letter
    rules = (
        _letter_after(r"^\s*(?:final\s+)?answer\s*:", valid),  # the answer line the prompt asks for
        _letter_after(r"\bthe\s+(?:correct\s+|final\s+|best\s+)?answer\s+is\s*:?", valid),
        _letter_after(r"\banswer\s*:", valid),
        re.compile(r"^\s*[(\[]?([" + valid + r"])[)\].]?\s*$", re.MULTILINE),  # a line holding only a letter
    )
    for rule in rules:
        # Case-insensitive prefixes must not make the letter itself lowercase-tolerant.
        hits = [m for m in rule.finditer(text)
                if m.group(1) in valid and not (m.re.groups > 1 and _is_article(m.group(1), m.group(2)))]
        if hits:
            return hits[-1].group(1)
    return None


def _from_json(text: str, valid: str) -> str | None:
    obj = json_object(text)
    answer = obj.get("answer") if obj is not None else None
    if isinstance(answer, str) and answer.strip()[:1] in valid and answer.strip():
        return answer.strip()[0]
    return None


def extract_letter_research(text: str, n_choices: int = 4) -> str | None:
    """The research code's free-form extraction (§5.2), for ``unisd eval --protocol research``.

    First rule that matches wins: the *first* ``^Answer: X`` line; ``the answer is X``; ``ANSWER: X``;
    the first line starting with a letter followed by ``.``, ``)`` or whitespace; the *last* standalone
    capital letter anywhere. Kept as the research code had it (§7.26), article "A" and all, so numbers
    can be compared with the paper's; :func:`extract_letter` is the default.
    """
    valid = letters_for(n_choices)
    rules = (
        re.compile(r"^Answer:\s*\(?([" + valid + r"])\)?", re.MULTILINE),
        re.compile(r"[Tt]he answer is\s*\(?([" + valid + r"])\)?"),
        re.compile(r"ANSWER:\s*\(?([" + valid + r"])\)?"),
        re.compile(r"^([" + valid + r"])[.)\s]", re.MULTILINE),
    )
    for rule in rules:
        match = rule.search(text)
        if match:
            return match.group(1)
    standalone = re.findall(r"\b([" + valid + r"])\b", text)
    return standalone[-1] if standalone else None

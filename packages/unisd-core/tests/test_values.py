"""``convert_value``: the one string-or-TOML-value conversion behind ``-o NAME.KEY=VALUE`` and ``--config``."""

from __future__ import annotations

import pytest

from unisd.errors import OptionError
from unisd.values import convert_value


@pytest.mark.parametrize(("raw", "tp", "expected"), [
    ("none", int | None, None),
    ("", float | None, None),
    (None, str | None, None),
    ("3", int | None, 3),
    ("a, b,", list[str], ["a", "b"]),
    (("1", 2), list[int], [1, 2]),
    (2, float, 2.0),  # a TOML integer for a float option
    (True, bool, True),
    ("Off", bool, False),
    ("yes", bool, True),
    ("0.5", float, 0.5),
    ("x", str, "x"),
])
def test_converts_text_and_typed_values(raw, tp, expected):
    value = convert_value(raw, tp, "opt")
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("raw", "tp", "message"), [
    ("maybe", bool, r"opt: expected bool, got 'maybe'"),
    ("1.5", int, r"opt: expected int, got '1.5'"),
    (True, float, r"opt: expected float, got True"),  # a bool is not a number here
    (3, list[int], r"opt: expected a list, got 3"),
    ("1,x", list[int], r"opt\[1\]: expected int, got 'x'"),
    ("a", dict, r"opt: unsupported option type"),
])
def test_reports_where_and_what_was_expected(raw, tp, message):
    with pytest.raises(OptionError, match=message):
        convert_value(raw, tp, "opt")

"""MBPP (``google-research-datasets/mbpp``): write a Python function that passes the given asserts."""

from __future__ import annotations

import ast
import re
from typing import Any, ClassVar

from unisd.data.prompts import fence_code
from unisd.data.tasks import Example

from ..sandbox import Program
from .code_base import CodeTask
from .sources import check_split, hub_rows, read_rows, require_fields, take

HUB_ID = "google-research-datasets/mbpp"
# Calls wrapped around the tested function in MBPP asserts, e.g. ``assert set(f(x)) == ...``.
WRAPPERS = {"math", "set", "sorted", "len", "list", "tuple", "str", "int", "float", "type", "isinstance",
            "round", "max", "min"}
NOTE = (
    "## Note\n"
    "- Write only the function implementation. Do not include any extra texts, explanations, test code, or examples.\n"
    "- Only return the code within a ```python ... ``` block.\n"
    "- Make sure the function name is correct as per the assertions.\n"
    "- Include necessary imports."
)


def asserted_name(test_list: list[str]) -> str | None:
    """The function the asserts call, skipping wrappers such as ``set(...)`` or ``math.isclose(...)``."""
    for line in test_list:
        body = re.sub(r"^\s*assert\s+", "", line)
        for match in re.finditer(r"([A-Za-z_][\w.]*)\s*\(", body):
            head = match.group(1).split(".")[0]
            if head not in WRAPPERS and head != "assert":
                return match.group(1).split(".")[-1]
    return None


def signature(code: str, name: str | None = None) -> str:
    """``name(arg1, arg2)`` of the first function defined in ``code`` (``name`` overrides its name)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return f"{name or 'solution'}(...)"
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            args = [a.arg for a in node.args.posonlyargs + node.args.args]
            if node.args.vararg:
                args.append("*" + node.args.vararg.arg)
            args += [a.arg for a in node.args.kwonlyargs]
            if node.args.kwarg:
                args.append("**" + node.args.kwarg.arg)
            return f"{name or node.name}({', '.join(args)})"
    return f"{name or 'solution'}(...)"


def defined_functions(code: str) -> list[str]:
    try:
        return [n.name for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef)]
    except SyntaxError:
        return re.findall(r"^\s*def\s+(\w+)", code, flags=re.MULTILINE)


def fix_function_name(code: str, test_list: list[str]) -> tuple[str, str | None]:
    """Rename the first ``def`` to the name the asserts call when the code does not define that name.

    Returns (code, name the tests call). A helper defined before the tested function is left alone.
    """
    wanted = asserted_name(test_list)
    names = defined_functions(code)
    if wanted is None or not names or wanted in names:
        return code, wanted or (names[0] if names else None)
    first = re.search(r"^(\s*def\s+)(\w+)", code, flags=re.MULTILINE)
    if first is None:
        return code, wanted
    return code[: first.start(2)] + wanted + code[first.end(2):], wanted


def student_prompt(text: str, sig: str, test_list: list[str]) -> str:
    """The method's MBPP student prompt (§4.2)."""
    tests = "\n".join(test_list)
    return (
        f"{text}\nThe required function signature is: {sig}\n\n{NOTE}\n\n"
        f"## Answer Format\n```python\ndef {sig}:\n    ...\n```\n\n## Test Cases\n{tests}\n"
    )


class MBPPTask(CodeTask):
    """MBPP (sanitized config): Python functions checked by executing the dataset's asserts."""

    name: ClassVar[str] = "mbpp"
    description: ClassVar[str] = "MBPP sanitized: write a Python function; scored by running its asserts (pass@k)"
    config: ClassVar[str] = "sanitized"
    splits: ClassVar[tuple[str, ...]] = ("train", "validation", "test", "prompt")
    train_split: ClassVar[str | None] = "train"
    eval_split: ClassVar[str] = "test"

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        check_split(self.name, split, self.splits)
        rows = read_rows(path) if path else hub_rows(self.name, HUB_ID, self.config, split)
        return [self.example(row, f"{path or HUB_ID}[{i}]") for i, row in enumerate(take(rows, limit))]

    def example(self, row: dict[str, Any], where: str) -> Example:
        """One Example from a hub row of either config (``prompt`` in sanitized, ``text`` in full)."""
        require_fields(self.name, row, ("task_id", "code", "test_list"), where)
        text = row.get("prompt") if row.get("prompt") is not None else row.get("text")
        if text is None:
            require_fields(self.name, row, ("prompt",), where)
        tests = [str(t) for t in row["test_list"]]
        imports = row.get("test_imports")
        setup = "\n".join(imports) if imports else (row.get("test_setup_code") or "")
        code, fn_name = fix_function_name(str(row["code"]).replace("\r\n", "\n"), tests)
        # The student is shown the name the asserts call (§7.11: the research code showed the original one).
        sig = signature(code, fn_name)
        example = Example(
            id=str(row["task_id"]),
            prompt=student_prompt(str(text).strip(), sig, tests),
            reference="",
            # The bare code too: few-shot and induction contexts fence it themselves, exactly once.
            meta={"test_list": tests, "test_setup": setup, "entry_point": fn_name, "code": code.strip()},
        )
        example.reference = self.render_reference(example, code)
        return example

    def render_reference(self, example: Example, answer: str, reasoning: str = "") -> str:
        """Code fenced like the answer format the student is asked for (§7.9: the research code used raw
        code); an answer already fenced is not fenced again. MBPP references carry no reasoning."""
        return fence_code(answer)

    def program(self, example: Example, code: str) -> Program:
        setup = example.meta.get("test_setup") or ""
        tests = "\n".join(example.meta["test_list"]) + "\n"
        return Program(code, setup=setup, tests=tests, entry_point=example.meta.get("entry_point"))


class MBPPFullTask(MBPPTask):
    """MBPP (full config, 374 training problems): what the method's orchestrator trains on."""

    name: ClassVar[str] = "mbpp-full"
    description: ClassVar[str] = "MBPP full config (374 train problems); scored like mbpp"
    config: ClassVar[str] = "full"

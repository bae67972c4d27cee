"""`unisd export` (a merged model for serving) and `unisd push` (against a local stand-in for the Hub)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.cli.command_line import command_line
from unisd.errors import UsageError
from unisd.io.model_card import is_unisd_card, render_model_card
from unisd.model.export import push_run
from unisd.plugins import get_plugin_manager


@pytest.fixture(scope="module")
def trained_run(tiny_llama, tmp_path_factory) -> Path:
    from unisd.testing import toy_records, write_jsonl

    root = tmp_path_factory.mktemp("export")
    data = write_jsonl(root / "train.jsonl", toy_records(8))
    out = root / "run"
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--data", str(data), "--steps", "2", "--output", str(out),
        "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--lr", "1e-2",
    ])
    assert result.exit_code == 0, result.output
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_export_merges_the_adapter_into_one_model_with_the_same_outputs(trained_run, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = CliRunner().invoke(make_app(get_plugin_manager()), ["export", str(trained_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = AutoPeftModelForCausalLM.from_pretrained(trained_run / "final").eval()
    ids = AutoTokenizer.from_pretrained(out)("What is 12 + 34?", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), rtol=1e-4, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(adapted.peft_config["default"].base_model_name_or_path).eval()
    assert not torch.allclose(_logits(base, ids), _logits(merged, ids))  # the adapter really was folded in
    card = (out / "README.md").read_text()
    assert is_unisd_card(out / "README.md") and "More Information Needed" not in card
    assert "steps: 2 (reached: 2)" in card and "lr 0.01" in card


def test_export_refuses_a_non_empty_output_and_a_run_without_final(trained_run, tmp_path):
    app = make_app(get_plugin_manager())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(trained_run), "-o", str(busy)])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (busy / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(app, ["export", str(tmp_path), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no finished model" in result.output
    assert not (tmp_path / "x").exists()


class LocalHub:
    """A stand-in for huggingface_hub.HfApi that keeps repositories in a local folder."""

    def __init__(self, root: Path):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type="model"):
        self.calls.append(("create_repo", repo_id, private))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return f"local://{repo_id}"

    def upload_folder(self, repo_id, folder_path, repo_type="model", commit_message=""):
        self.calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)


def test_push_uploads_the_adapter_and_its_card(trained_run, tmp_path):
    hub = LocalHub(tmp_path / "hub")
    url = push_run(trained_run, "me/tiny-sd", private=True, api=hub)
    assert url == "local://me/tiny-sd"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[0][2] is True
    repo = tmp_path / "hub" / "me" / "tiny-sd"
    assert (repo / "adapter_config.json").is_file() and (repo / "adapter_model.safetensors").is_file()
    assert is_unisd_card(repo / "README.md")


@pytest.mark.parametrize("repo", ["", "a/b/c", " me/x"])
def test_push_refuses_a_malformed_repository_id(trained_run, repo, tmp_path):
    with pytest.raises(UsageError, match="repository id"):
        push_run(trained_run, repo, api=LocalHub(tmp_path))


def test_push_failure_is_one_clear_error(trained_run):
    class Refusing:
        def create_repo(self, **kwargs):
            raise OSError("401 Unauthorized")

    with pytest.raises(UsageError, match="hf auth login"):
        push_run(trained_run, "me/x", api=Refusing())


def test_card_reports_held_out_metrics(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "config.toml").write_text('model = "org/base"\nsteps = 60\nlora = true\nlora_r = 16\n'
                                          '[components.ema]\nbeta = 0.9\n')
    (tmp_path / "eval" / "before.json").write_text('{"student_accuracy": 0.0, "teacher_accuracy": 0.667, "n": 48}')
    (tmp_path / "eval" / "after.json").write_text('{"student_accuracy": 0.1875, "teacher_accuracy": 0.667, "n": 48}')
    card = render_model_card(tmp_path, command="unisd train --steps 60")
    assert "base_model: org/base" in card and "`ema` (beta=0.9)" in card
    assert "| student accuracy | 0.000 | 0.188 |" in card and "Held-out items: 48" in card
    assert "unisd train --steps 60" in card


def test_training_writes_a_model_card_naming_its_command(trained_run):
    card = (trained_run / "final" / "README.md").read_text()
    assert "More Information Needed" not in card and "```bash\nunisd " in card and "--steps 2" in card


def test_push_to_hub_with_a_malformed_id_is_refused_before_training(tiny_llama, tmp_path):
    from unisd.testing import toy_records, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", toy_records(4))
    result = CliRunner().invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--data", str(data), "--steps", "1", "--output", str(tmp_path / "run"),
        "--push-to-hub", "not a repo",
    ])
    assert result.exit_code == 2 and "repository id" in result.output
    assert not (tmp_path / "run").exists()


def test_command_line_is_rebuilt_from_the_given_options_only():
    app, seen = typer.Typer(), []

    @app.callback()
    def root() -> None:
        pass

    @app.command("train")
    def train(ctx: typer.Context, run: str = typer.Argument("x"), model: str = typer.Option(None, "--model"),
              steps: int = typer.Option(100, "--steps"), lora: bool = typer.Option(None, "--lora/--full"),
              with_: list[str] = typer.Option(None, "--with")) -> None:
        seen.append(command_line(ctx))

    result = CliRunner().invoke(app, ["train", "r 1", "--model", "m", "--full", "--with", "a", "--with", "b"])
    assert result.exit_code == 0, result.output
    assert seen == ["unisd train 'r 1' --model m --full --with a --with b"]  # --steps kept its default: left out


def test_resume_with_config_is_refused_not_ignored(trained_run, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text("lr = 0.5\n")
    before = (trained_run / "config.toml").read_text()
    result = CliRunner().invoke(make_app(get_plugin_manager()),
                                ["train", "--resume", str(trained_run), "--config", str(other), "--steps", "3"])
    assert result.exit_code == 2 and "--config is not used with --resume" in result.output
    assert (trained_run / "config.toml").read_text() == before

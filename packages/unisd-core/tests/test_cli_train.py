"""`unisd train` from the command line on tiny local models: run directory, reload, clear errors."""

import json
import tomllib
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from unisd.cli.app import make_app
from unisd.hookspecs import hookimpl
from unisd.plugins import get_plugin_manager


class EmaStandIn:
    """A test component named like the real EMA, to check name suggestions and option typing."""

    name = "ema"

    @dataclass
    class Options:
        beta: float = 0.9
        sync_steps: int = 10

    def __init__(self, options):
        self.options = options


class TestPlugin:
    @hookimpl
    def register_components(self, register):
        register(EmaStandIn)


def app_with_test_component():
    pm = get_plugin_manager(load_entry_points=False)
    pm.register_plugin(TestPlugin(), "test-plugin", "tests")
    return make_app(pm)


def invoke(app, args):
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2"])
def test_train_writes_run_directory_and_final_reloads(model_fixture, request, toy_data, tmp_path):
    model_dir = request.getfixturevalue(model_fixture)
    out = tmp_path / "run"
    result = invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(model_dir), "--data", str(toy_data), "--steps", "2", "--output", str(out),
        "--batch-size", "2", "--grad-accum", "2", "--max-new-tokens", "6",
    ])
    assert result.exit_code == 0, result.output
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["steps"] == 2 and config["model"] == str(model_dir) and config["lora"] is True
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "divergence", "completion_length", "learning_rate", "tokens_per_s", "elapsed_s"):
        assert key in records[0]
    ckpt = out / "checkpoints" / "step-2"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["cursor"] == 8

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    reloaded = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("hello", return_tensors="pt")["input_ids"]
    assert reloaded(ids).logits.shape[-1] == len(tok)


def test_full_finetuning_writes_loadable_weights(tiny_llama, toy_data, tmp_path):
    out = tmp_path / "full"
    result = invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--data", str(toy_data), "--steps", "1", "--output", str(out),
        "--batch-size", "4", "--grad-accum", "1", "--max-new-tokens", "4", "--full", "--lr", "1e-3",
    ])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    changed = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters(), strict=True))
    assert changed


def test_unknown_component_suggests_and_exits_2(toy_data, tiny_llama):
    result = invoke(app_with_test_component(), ["train", "--model", str(tiny_llama), "--data", str(toy_data), "--with", "emma"])
    assert result.exit_code == 2
    assert "Unknown component 'emma'. Did you mean: ema?" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "ema.bta=0.5", "--with", "ema"], "Unknown option 'ema.bta'. Did you mean: beta?"),
        (["-o", "ema.beta=high", "--with", "ema"], "option ema.beta: expected float, got 'high'"),
        (["-o", "ema.beta=0.5"], "component 'ema' is not selected; add --with ema"),
        (["-o", "nonsense"], "expected name.key=value"),
        (["--task", "nosuchtask"], "Unknown task 'nosuchtask'"),
        (["--backend", "vlm"], "Unknown backend 'vlm'"),
        (["--preset", "nope"], "Unknown preset 'nope'"),
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
        (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["--lr", "-1e-3"], "--lr must be a finite number > 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be ≥ 1, got 0"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be ≥ 1, got -5"),
    ],
)
def test_bad_input_gives_one_clear_error_and_exit_2(args, message, tiny_llama, toy_data, tmp_path):
    base = ["train", "--model", str(tiny_llama), "--output", str(tmp_path / "o")]
    if "--task" not in args:
        base += ["--data", str(toy_data)]
    result = invoke(app_with_test_component(), base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()  # nothing written half-way


def test_bad_data_file_names_file_and_line(tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "only a prompt"}\n')
    result = invoke(make_app(get_plugin_manager()), ["train", "--model", str(tiny_llama), "--data", str(data)])
    assert result.exit_code == 2
    assert f"{data}:2: no field 'reference'" in result.output and "--reference-column" in result.output


def test_missing_model_directory(toy_data, tmp_path):
    result = invoke(make_app(get_plugin_manager()), ["train", "--model", str(tmp_path / "nope"), "--data", str(toy_data)])
    assert result.exit_code == 2
    assert "no such directory" in result.output


def test_output_directory_must_be_new(tiny_llama, toy_data, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "something").write_text("x")
    result = invoke(make_app(get_plugin_manager()), ["train", "--model", str(tiny_llama), "--data", str(toy_data), "--output", str(out)])
    assert result.exit_code == 2
    assert "exists and is not empty" in result.output


def test_config_file_with_flag_override(tiny_llama, toy_data, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{tiny_llama}"\ndata = "{toy_data}"\nsteps = 5\nbatch_size = 2\ngrad_accum = 1\nmax_new_tokens = 4\n')
    out = tmp_path / "cfgrun"
    result = invoke(make_app(get_plugin_manager()), ["train", "--config", str(cfg), "--steps", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert tomllib.loads((out / "config.toml").read_text())["steps"] == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    result = invoke(make_app(get_plugin_manager()), ["train", "--config", str(bad)])
    assert result.exit_code == 2 and "unknown setting 'stepz'. Did you mean: steps?" in result.output


def test_version_and_help():
    app = make_app(get_plugin_manager())
    result = invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("unisd ")
    result = invoke(app, ["--help"])
    assert result.exit_code == 0 and "unisd train --model DIR --data train.jsonl" in result.output


def test_eval_during_training_logs_student_teacher_and_gap(tiny_llama, toy_data, tmp_path):
    out = tmp_path / "evalrun"
    result = invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--data", str(toy_data), "--steps", "2", "--output", str(out),
        "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4",
        "--eval-task", "demo", "--eval-every", "2", "--eval-limit", "6",
    ])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval/demo/student_accuracy" not in records[0]
    last = records[1]
    for key in ("student_accuracy", "teacher_accuracy", "privileged_gap"):
        assert 0.0 <= abs(last[f"eval/demo/{key}"]) <= 1.0
    assert last["eval/demo/privileged_gap"] == pytest.approx(
        last["eval/demo/teacher_accuracy"] - last["eval/demo/student_accuracy"])
    assert last["eval/demo/n"] == 6


@pytest.mark.parametrize("lora, dtype, loaded", [(False, "auto", "float32"), (True, "auto", "auto"),
                                                 (False, "bfloat16", "bfloat16")])
def test_full_finetuning_keeps_float32_weights_unless_told_otherwise(monkeypatch, tiny_llama, toy_data, lora, dtype,
                                                                     loaded):
    """'auto' is bf16 on a GPU; trained bf16 weights would round most AdamW updates away, so --full loads fp32."""
    import unisd.run as run_module
    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter

    seen = []
    real_load = run_module.load_model

    def spy(source, dtype, *args, **kwargs):
        seen.append(dtype)
        return real_load(source, dtype, *args, **kwargs)

    monkeypatch.setattr(run_module, "load_model", spy)
    run_module.build_run(RunConfig(model=str(tiny_llama), data=str(toy_data), lora=lora, dtype=dtype),
                   get_plugin_manager(), Reporter(), None)
    assert seen == [loaded]


@pytest.mark.parametrize("flags, warning", [(["--full", "--dtype", "bfloat16"], "rounded away"),
                                           (["--dtype", "float16"], "no loss scaler")])
def test_half_precision_training_warns_what_it_loses(tiny_llama, toy_data, tmp_path, flags, warning):
    result = invoke(make_app(get_plugin_manager()), [
        "train", "--model", str(tiny_llama), "--data", str(toy_data), "--steps", "1", "--output", str(tmp_path / "o"),
        "--batch-size", "2", "--max-new-tokens", "4", *flags,
    ])
    assert result.exit_code == 0, result.output
    assert warning in result.output
    assert "rounded away" not in result.output or "--full" in flags


@pytest.mark.parametrize("tf32, precision", [(True, "high"), (False, "highest")])
def test_float32_matmuls_use_tf32_on_gpus_unless_turned_off(monkeypatch, tiny_llama, toy_data, tf32, precision):
    """Emulated GPU: float32 weights (--full) multiply as TF32 by default; tf32 = false keeps full float32."""
    import unisd.run as run_module
    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter

    set_to = []
    real_load = run_module.load_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", set_to.append)
    monkeypatch.setattr(run_module, "load_model", lambda *a, **kw: real_load(*a, **{**kw, "to_gpu": False}))
    run_module.build_run(RunConfig(model=str(tiny_llama), data=str(toy_data), lora=False, tf32=tf32),
                   get_plugin_manager(), Reporter(), None)
    assert set_to == [precision]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "a", "reference": "b"}\n{"prompt": "caf\xe9", "reference": "b"}\n',
         ":2: not UTF-8 text (byte 0xe9 at byte 16 of the line)"),
        (b'{"prompt": "a \\ud800 b", "reference": "c"}\n',
         ":1: field 'prompt' holds a lone surrogate (\\ud800 at character 3)"),
        (b'{"prompt": "a", "reference": "b", "meta": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
         ":1: JSON nested too deeply to read"),
    ],
    ids=["not-utf8", "lone-surrogate", "deep-nesting"],
)
def test_unreadable_data_is_one_clear_error(content, message, tiny_llama, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "o"
    result = invoke(make_app(get_plugin_manager()), ["train", "--model", str(tiny_llama), "--data", str(data),
                                                     "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert f"{data}{message}" in result.output.replace("\n", "")
    assert not out.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").write_text('{"model_type": "llama", "hidden'), "config.json is not valid JSON"),
        (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
         "model.safetensors is damaged or cut short"),
    ],
    ids=["config-json", "truncated-weights"],
)
def test_damaged_model_directory_is_one_clear_error(damage, message, tiny_llama, toy_data, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    damage(model)
    out = tmp_path / "o"
    result = invoke(make_app(get_plugin_manager()), ["train", "--model", str(model), "--data", str(toy_data),
                                                     "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert f"--model {model}: {message}" in result.output.replace("\n", "")
    assert not out.exists()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny model whose tokenizer has no chat template (as base models ship)."""
    from unisd.testing import make_tiny_model, make_tokenizer

    path = tmp_path_factory.mktemp("base-model")
    tokenizer = make_tokenizer(chat_template=False)
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_missing_chat_template_is_refused_with_the_fix_named(base_model, toy_data, tmp_path):
    out = tmp_path / "o"
    args = ["train", "--model", str(base_model), "--data", str(toy_data), "--output", str(out), "--steps", "1",
            "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4"]
    result = invoke(make_app(get_plugin_manager()), args)
    assert result.exit_code == 2, result.output
    said = result.output.replace("\n", "")
    assert "the tokenizer has no chat template" in said
    assert "chat_template" in said and "--allow-no-chat-template" in said
    assert not out.exists()

    result = invoke(make_app(get_plugin_manager()), [*args, "--allow-no-chat-template"])
    assert result.exit_code == 0, result.output
    assert tomllib.loads((out / "config.toml").read_text())["allow_no_chat_template"] is True


def test_chat_template_setting_supplies_a_missing_template(base_model, toy_data, tmp_path):
    from transformers import AutoTokenizer

    from unisd.testing import CHAT_TEMPLATE

    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "{base_model}"\ndata = "{toy_data}"\nsteps = 1\nbatch_size = 2\ngrad_accum = 1\n'
                   f"max_new_tokens = 4\nchat_template = {json.dumps(CHAT_TEMPLATE)}\n")
    out = tmp_path / "o"
    result = invoke(make_app(get_plugin_manager()), ["train", "--config", str(cfg), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert AutoTokenizer.from_pretrained(out / "final").chat_template == CHAT_TEMPLATE


def test_resume_accepts_repeated_components_and_options_and_refuses_changed_ones(tiny_llama, toy_data, tmp_path):
    app = app_with_test_component()
    out = tmp_path / "run"
    start = ["train", "--model", str(tiny_llama), "--data", str(toy_data), "--steps", "1", "--output", str(out),
             "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--with", "ema", "-o", "ema.beta=0.5"]
    assert invoke(app, start).exit_code == 0
    # the starting command again, with --resume and more steps: same components, same (typed) option value
    again = invoke(app, [*start[:5], "--steps", "2", *start[7:], "--resume", str(out)])
    assert again.exit_code == 0, again.output
    changed = invoke(app, ["train", "--resume", str(out), "--steps", "3", "--with", "ema", "-o", "ema.beta=0.6"])
    assert changed.exit_code == 2 and "--with/-o (saved" in changed.output

"""Sharded training (FSDP2): where the settings come from, and a launched run that resumes exactly.

The update itself (2 sharded processes == 1 process) is checked in test_distributed.py.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from unisd.errors import ConfigError
from unisd.parallel.sharding import ShardPlan, choose_plan, plan_from_accelerate, plan_from_deepspeed
from unisd.testing import make_tiny_model_dir, toy_records, write_jsonl


def _ds(tmp_path, config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


# ----------------------------------------------------------------------------------------------
# Plans


def test_accelerate_fsdp2_settings_pass_through():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false",
           "FSDP_OFFLOAD_PARAMS": "true", "FSDP_ACTIVATION_CHECKPOINTING": "true", "ACCELERATE_MIXED_PRECISION": "bf16"}
    plan = plan_from_accelerate(env)
    assert plan == ShardPlan(reshard_after_forward=False, cpu_offload=True, param_dtype="bfloat16",
                             activation_checkpointing=True, source="accelerate FSDP config")


def _fsdp1(strategy="FULL_SHARD", reshard="true"):
    """The environment `accelerate launch --use_fsdp` sets for FSDP version 1: both keys, always."""
    return {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": strategy,
            "FSDP_RESHARD_AFTER_FORWARD": reshard}


@pytest.mark.parametrize(("env", "reshard"), [
    (_fsdp1("FULL_SHARD"), True), (_fsdp1("1"), True), (_fsdp1("SHARD_GRAD_OP"), False),
    # a config file's fsdp_reshard_after_forward names the FSDP1 strategy (the launcher lowercases it)
    (_fsdp1("FULL_SHARD", "shard_grad_op"), False), (_fsdp1("FULL_SHARD", "no_reshard"), False),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, False),
])
def test_accelerate_fsdp1_strategies_map_to_fsdp2(env, reshard):
    plan = plan_from_accelerate(env)
    assert plan is not None and plan.reshard_after_forward is reshard and not plan.cpu_offload


def test_accelerate_no_shard_is_plain_data_parallelism_and_hybrid_is_a_2d_mesh():
    assert plan_from_accelerate(_fsdp1("NO_SHARD")) is None
    assert plan_from_accelerate(_fsdp1("FULL_SHARD", "no_shard")) is None
    assert plan_from_accelerate({"ACCELERATE_MIXED_PRECISION": "no"}) is None  # a plain multi-GPU launch
    for env, reshard in ((_fsdp1("HYBRID_SHARD"), True), (_fsdp1("FULL_SHARD", "hybrid_shard_zero2"), False),
                         (_fsdp1("4"), True)):
        plan = plan_from_accelerate(env)
        assert plan.hybrid and plan.reshard_after_forward is reshard and "hybrid" in plan.describe()
    assert not plan_from_accelerate(_fsdp1("FULL_SHARD")).hybrid
    with pytest.raises(ConfigError, match="unknown sharding strategy SIDEWAYS"):
        plan_from_accelerate(_fsdp1("SIDEWAYS"))
    assert choose_plan("hybrid", None, 4, env={}).hybrid and not choose_plan("fsdp", None, 4, env={}).hybrid


@pytest.mark.parametrize(("world", "local", "shape"), [(4, "2", (2, 2)), (2, "2", (1, 2)), (2, "1", (2, 1))])
def test_hybrid_mesh_rows_are_machines(monkeypatch, world, local, shape):
    import torch.distributed as dist
    from torch.distributed import device_mesh

    from unisd.parallel import sharding

    made = []
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda device, dims, mesh_dim_names: made.append(
        (dims, mesh_dim_names)))
    sharding.hybrid_mesh({"LOCAL_WORLD_SIZE": local})
    assert made == [(shape, ("replicate", "shard"))]


def test_hybrid_mesh_needs_equal_machines(monkeypatch):
    import torch.distributed as dist

    from unisd.errors import UsageError
    from unisd.parallel import sharding

    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    with pytest.raises(UsageError, match="same number of processes on every machine: 3 in all, 2 on this one"):
        sharding.hybrid_mesh({"LOCAL_WORLD_SIZE": "2"})


def test_fp16_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="use bf16"):
        plan_from_accelerate({"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "fp16"})


@pytest.mark.parametrize(("stage", "reshard"), [(1, False), (2, False), (3, True)])
def test_deepspeed_zero_stages_map_to_fsdp2(tmp_path, stage, reshard):
    path = _ds(tmp_path, {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
                          "bf16": {"enabled": True}, "optimizer": {"type": "AdamW"}, "train_batch_size": "auto"})
    plan = plan_from_deepspeed(path)
    assert plan.reshard_after_forward is reshard
    assert plan.cpu_offload and plan.param_dtype == "bfloat16"
    assert plan.ignored[0].startswith("optimizer (")  # named; "auto" values are not reported
    assert not any("train_batch_size" in note for note in plan.ignored)
    assert f"ZeRO-{stage}" in plan.source


def test_deepspeed_stage_0_and_bad_configs(tmp_path):
    assert plan_from_deepspeed(_ds(tmp_path, {"zero_optimization": {"stage": 0}})) is None
    with pytest.raises(ConfigError, match="no such file"):
        plan_from_deepspeed(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="stage must be 0, 1, 2 or 3"):
        plan_from_deepspeed(_ds(tmp_path, {"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="NVMe"):
        plan_from_deepspeed(_ds(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}))
    with pytest.raises(ConfigError, match="fp16"):
        plan_from_deepspeed(_ds(tmp_path, {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        plan_from_deepspeed(tmp_path / "bad.json")


def test_deepspeed_auto_precision_follows_the_launcher_and_partial_offload_is_noted(tmp_path):
    path = _ds(tmp_path, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                          "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}})
    assert plan_from_deepspeed(path).param_dtype is None
    plan = plan_from_deepspeed(path, "bf16")
    assert plan.param_dtype == "bfloat16" and plan.cpu_offload
    assert any("offload_optimizer without offload_param" in note for note in plan.ignored)
    with pytest.raises(ConfigError, match="fp16"):
        plan_from_deepspeed(path, "fp16")
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}
    with pytest.raises(ConfigError, match="NVMe"):
        plan_from_accelerate(env)


def test_accelerate_deepspeed_launch_reads_its_config_file(tmp_path):
    path = _ds(tmp_path, {"zero_optimization": {"stage": 3}})
    plan = plan_from_accelerate({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)})
    assert plan.reshard_after_forward and str(path) in plan.source
    plan = plan_from_accelerate({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                                 "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"})
    assert not plan.reshard_after_forward and plan.cpu_offload


def test_cpu_offload_is_dropped_with_a_note_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = choose_plan("auto", None, 2, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                         "FSDP_OFFLOAD_PARAMS": "true"})
    assert plan is not None and not plan.cpu_offload
    assert any("CPU offload" in note for note in plan.ignored)


def test_choose_plan_precedence(tmp_path):
    fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert choose_plan("auto", None, 2, fsdp_env) is not None
    assert choose_plan("none", None, 2, fsdp_env) is None  # explicit beats the launcher
    assert choose_plan("fsdp", None, 2, {}) == ShardPlan()
    assert choose_plan("fsdp", None, 1, {}) is None  # one process: nothing to shard over
    path = _ds(tmp_path, {"zero_optimization": {"stage": 2}})
    assert choose_plan("auto", str(path), 2, {}).reshard_after_forward is False
    with pytest.raises(ConfigError, match="drop one of them"):
        choose_plan("none", str(path), 2, {})
    stage0 = tmp_path / "stage0.json"
    stage0.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    assert choose_plan("auto", str(stage0), 2, {}) is None
    with pytest.raises(ConfigError, match="stage 0"):
        choose_plan("fsdp", str(stage0), 2, {})
    with pytest.raises(ConfigError, match="--shard must be one of"):
        choose_plan("zero3", None, 2, {})


def test_cli_reports_a_bad_deepspeed_config_with_exit_2(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(4))
    result = subprocess.run(
        [sys.executable, "-m", "unisd", "train", "--model", str(model_dir), "--data", str(data), "--steps", "1",
         "--output", str(tmp_path / "run"), "--deepspeed", str(tmp_path / "nope.json")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "nope.json: no such file" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()  # nothing written half-way


# ----------------------------------------------------------------------------------------------
# A launched run


def _train(args, env):
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_accelerate_fsdp_launch_trains_checkpoints_and_resumes_exactly(tmp_path):
    """`accelerate launch` with an FSDP config shards the run; a resume from a mid-run checkpoint of
    the sharded run reproduces its final weights (weights, optimizer, EMA and RNG all round-trip)."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train_args = ["-m", "unisd", "train", "--model", str(model_dir), "--data", str(data), "--steps", "3",
                  "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "5", "--lr", "1e-2",
                  "--save-every", "1", "--with", "ema", "-o", "ema.sync_steps=1", "--output", str(out)]
    first = _train([accelerate, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--use_fsdp", "--fsdp_version", "2", *train_args], env)
    assert "Sharding: FSDP2 full shard" in first.stdout + first.stderr
    assert first.stdout.count("Done in") == 1  # the summary comes from the main process only
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert len(torch.load(out / "checkpoints" / "step-3" / "rng.pt", weights_only=False)) == 2
    ema_state = torch.load(out / "checkpoints" / "step-3" / "components.pt", weights_only=False)["ema"]
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    # whole tensors were saved, not one process's shard
    for name, tensor in ema_state["shadow"].items():
        saved = adapter[name.replace(".default.", ".")]
        assert tensor.shape == saved.shape and not tensor.equal(saved)  # the teacher lags the student
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(out / "final").r > 0

    expected = {k: v.clone() for k, v in adapter.items()}
    _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "unisd",
            "train", "--resume", str(out / "checkpoints" / "step-2"), "--shard", "fsdp"], env)
    resumed = load_file(str(out / "final" / "adapter_model.safetensors"))
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, rtol=0, atol=1e-6), name
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("flags, message", [
    (["--with", "contrastive", "--shard", "fsdp"], "none of the 8 examples has a negative demonstration"),
    (["--backend", "vllm"], "--backend vllm runs in one process only"),  # refused before vLLM is imported
])
def test_bad_input_under_num_processes_is_one_message_and_exit_2(tmp_path, flags, message):
    """Every process meets the same bad input: the user sees its message once, and exit code 2
    (not the launcher's traceback and exit 1)."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))  # no negative demonstrations
    result = subprocess.run(
        [sys.executable, "-m", "unisd", "train", "--model", str(model_dir), "--data", str(data), "--steps", "1",
         "--output", str(tmp_path / "run"), "--num-processes", "2", *flags],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert (result.stdout + result.stderr).count(message) == 1
    assert not (tmp_path / "run").exists()
    assert "ChildFailedError" not in result.stderr


def test_sharded_full_fine_tuning_resumes_exactly(tmp_path):
    """--full under FSDP: the tied lm-head is saved under both names and loads back; a resume from
    step 1 reproduces the final weights."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "unisd", "train"]
    _train([*launch, "--model", str(model_dir), "--data", str(data), "--steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--max-new-tokens", "5", "--lr", "1e-3", "--save-every", "1", "--full",
            "--shard", "fsdp", "--output", str(out)], env)
    expected = load_file(str(out / "final" / "model.safetensors"))
    _train([*launch, "--resume", str(out / "checkpoints" / "step-1")], env)
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, rtol=0, atol=1e-6), name
    # Only the main process reads a sharded checkpoint: what it cannot read stops every process at once
    # (one message; torchrun reports its workers' exit 2 as 1), none waits for a broadcast. (Without its
    # manifest, as older checkpoints are: the damage is found on loading, not before.)
    (out / "checkpoints" / "step-1" / "optimizer.pt").write_bytes(b"not a torch file")
    (out / "checkpoints" / "step-1" / "manifest.json").unlink()
    broken = subprocess.run([*launch, "--resume", str(out / "checkpoints" / "step-1")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0 and "exitcode: 2" in broken.stderr, broken.stderr[-3000:]
    said = broken.stdout + broken.stderr
    assert said.count("optimizer.pt: cannot be read (not a torch file") == 1, broken.stdout + broken.stderr[-3000:]


def test_positional_optimizer_state_of_older_checkpoints_resumes_exactly(tmp_path):
    """Checkpoints written before the optimizer state was keyed by name still resume to the same weights."""
    from unisd.config import RunConfig
    from unisd.io.reporting import Reporter
    from unisd.loop import train
    from unisd.plugins import get_plugin_manager

    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    cfg = RunConfig(model=str(model_dir), data=str(data), steps=2, save_every=1, batch_size=2, grad_accum=1,
                    max_new_tokens=4, lr=1e-2, output=str(tmp_path / "run"))
    out = train(cfg, get_plugin_manager(), Reporter())
    expected = load_file(str(out / "final" / "adapter_model.safetensors"))
    ckpt = out / "checkpoints" / "step-1"
    named = torch.load(ckpt / "optimizer.pt", weights_only=False)
    order = [n for g in named["param_groups"] for n in g["params"]]
    assert named["state"] and all(isinstance(k, str) for k in named["state"])
    positional = {"state": {order.index(k): v for k, v in named["state"].items()},
                  "param_groups": [{**g, "params": [order.index(n) for n in g["params"]]} for g in named["param_groups"]]}
    torch.save(positional, ckpt / "optimizer.pt")
    (ckpt / "manifest.json").unlink()  # older checkpoints have none
    train(RunConfig(**{**cfg.__dict__}), get_plugin_manager(), Reporter(), resume=ckpt)
    resumed = load_file(str(out / "final" / "adapter_model.safetensors"))
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, rtol=0, atol=1e-6), name


def test_bf16_mixed_precision_from_the_launcher_trains(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
           "ACCELERATE_MIXED_PRECISION": "bf16"}
    result = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "unisd",
                     "train", "--model", str(model_dir), "--data", str(data), "--steps", "2", "--batch-size", "2",
                     "--grad-accum", "1", "--max-new-tokens", "5", "--with", "ema", "--output", str(out)], env)
    assert "bfloat16 compute" in result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["nonfinite_skipped"] == 0 for r in records)
    assert load_file(str(out / "final" / "adapter_model.safetensors"))  # whole float32 adapter tensors


def test_a_torch_without_fsdp2_sum_reductions_is_refused_before_loading(monkeypatch):
    """torch < 2.9 has no force-sum reductions; sharding would average (or, on gloo, fail) mid-run."""
    from torch.distributed.fsdp import FSDPModule

    from unisd.errors import UsageError
    from unisd.parallel import sharding

    sharding.require_support()  # this torch has them
    monkeypatch.delattr(FSDPModule, "set_force_sum_reduction_for_comms")
    with pytest.raises(UsageError, match=r"torch >= 2\.9.*--shard none"):
        sharding.require_support()


@pytest.mark.parametrize("offload, kept_whole", [(False, True), (True, False)])
def test_generation_keeps_blocks_whole_unless_offloaded(tmp_path, monkeypatch, offload, kept_whole):
    """Generation gathers each block once and keeps it (fast), except under CPU offload, where the whole
    model may not fit the GPU: there each block is gathered per forward. (One-process gloo group; the
    offload flag is set on the plan after sharding, as FSDP's CPU offload needs a GPU.)"""
    import dataclasses
    import tempfile

    import torch.distributed as dist

    from unisd.model.models import load_model
    from unisd.parallel import sharding

    dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(dir=tmp_path), 1), rank=0, world_size=1)
    try:
        model = load_model(str(make_tiny_model_dir(tmp_path / "model")), "float32")
        sharding.shard_model(model, ShardPlan(reshard_after_forward=True))
        model._unisd_plan = dataclasses.replace(model._unisd_plan, cpu_offload=offload)
        settings = []
        for unit in model.modules():
            if sharding.is_sharded(unit) and unit is not model:
                monkeypatch.setattr(unit, "set_reshard_after_forward",
                                    lambda value, recurse=True: settings.append(value))
        with sharding.gathered(model, keep_blocks=True):
            pass
        assert (False in settings) == kept_whole, settings
    finally:
        dist.destroy_process_group()

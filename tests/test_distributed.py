"""Two processes (gloo, CPU) and one process over the same global batch give the same update."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from unisd.testing import make_tiny_model_dir, toy_records, write_jsonl

WORKER = textwrap.dedent('''
    import dataclasses, json, os, sys, torch
    from unisd.parallel import distributed, sharding
    if os.environ.get("TEST_WHOLE_ROWS"):  # see test_two_processes_match_one
        from unisd.model import scoring
        scoring.MIN_SHARED_PREFIX = 10**9
    from unisd.config import RunConfig
    from unisd.components import call_each
    from unisd.run import build_run
    from unisd.step import distill_step
    from unisd.plugins import get_plugin_manager
    from unisd.io.reporting import Reporter
    from unisd.model.rollout import Completion

    model_dir, data, components, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    shard, lora, overrides = sys.argv[5], sys.argv[6] == "lora", json.loads(sys.argv[7])
    env = distributed.init_from_env()
    per_process = overrides.pop("batch_size", 2)  # 8 examples per step, in micro-batches of this size
    cfg = RunConfig(model=model_dir, data=data, batch_size=per_process, grad_accum=8 // (per_process * env.world_size),
                    lora_dropout=0.0, max_new_tokens=8, components=components, lr=1e-2, shard=shard, lora=lora,
                    **overrides)
    import unisd.run
    loads, real_load = [], unisd.run.load_model
    unisd.run.load_model = lambda *a, **kw: loads.append(kw.get("on_meta", False)) or real_load(*a, **kw)
    run = build_run(cfg, get_plugin_manager(), Reporter(), None)
    sharded = shard in ("fsdp", "auto", "hybrid") and env.active
    assert sharding.is_sharded(run.model) == sharded
    # under sharding only the main process reads the weights; the others build on the meta device
    assert loads == [sharded and not env.is_main], loads
    assert not any(t.is_meta for t in (*run.model.parameters(), *run.model.buffers()))
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                sharding.copy_whole_into(p, torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape))
    params = [p for p in run.model.parameters() if p.requires_grad]
    # SGD: the optimiser is not under test, and AdamW's per-entry normalisation would magnify round-off.
    opt = torch.optim.SGD(params, lr=0.5)
    eos = run.tokenizer.eos_token_id
    completions = [Completion([20 + i, 30 + (i * 7) % 50, 40 + i % 3] + ([eos] if i % 3 else []), i % 3 == 0)
                   for i in range(8)]
    losses, grads = [], []
    for step in (1, 2):  # two optimiser steps, so an EMA sync (sync_steps=1) changes the second teacher
        idx = distributed.shard(list(range(8)), env)
        stats = distill_step(run, [run.examples[i] for i in idx], [completions[i] for i in idx])  # summed gradients
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        grads.append([sharding.whole(p.grad.detach()).clone() for p in params])
        opt.step()
        opt.zero_grad()
        run.step = step
        call_each(run.components, "on_step_end", run)
        losses.append(distributed.sum_scalar(stats["loss"]))
    whole_params = [sharding.whole(p.detach()) for p in params]
    # greedy generation from the (sharded) model: the same tokens on every process count
    from unisd.model.rollout import HFBackend, SamplingParams
    prompts = [run.student_ids(e) for e in run.examples[:3]]
    generated = [c.ids for c in HFBackend(run.model, run.tokenizer).generate(prompts, SamplingParams(0.0, 1.0, 6))]
    # evaluation split over the processes (5 items: the second process's share is padded), gathered in order
    from unisd.evaluation.evaluate import evaluate
    from unisd.data.tasks import Score, Task

    class ByIndex(Task):
        def score(self, example, completion):
            return Score(float(example.id in ("0", "3")), extracted=example.id)

    items = [dataclasses.replace(e, id=str(i)) for i, e in enumerate(run.examples[:5])]
    result = evaluate(run.model, run.tokenizer, ByIndex(), items, 6, split_over_processes=True)
    evaluated = [result.metrics, [s.extracted for s in result.scores], result.completions]
    if env.is_main:
        mesh = getattr(next(iter(run.model.parameters())), "device_mesh", None)
        torch.save({"params": whole_params, "losses": losses, "grads": grads, "generated": generated,
                    "evaluated": evaluated, "mesh": mesh.mesh.tolist() if mesh is not None and mesh.ndim == 2 else None},
                   out)
    distributed.shutdown()
''')


# An accelerate FSDP launch's environment with SHARD_GRAD_OP (ZeRO-2: blocks stay whole until backward)
# (as `accelerate launch --use_fsdp --fsdp_sharding_strategy SHARD_GRAD_OP` sets it: the reshard flag is always there)
ZERO2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP",
             "FSDP_RESHARD_AFTER_FORWARD": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(target, nproc, env, nodes=1):
    """Run ``target`` (a script and its arguments, or ``-m module ...``) in ``nproc`` processes on each of
    ``nodes`` node ranks, every node rank its own torchrun agent on this machine (static rendezvous on
    a local port, as on a cluster with one launcher per machine). Returns the agents' results."""
    if nproc == 1 and nodes == 1:
        return [subprocess.run([sys.executable, *target], env=env, capture_output=True, text=True, timeout=300)]
    if nodes == 1:
        # --standalone: the launcher picks a free rendezvous port itself (no race for a port we chose)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]
        return [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)]
    port = _free_port()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                                f"--node-rank={rank}", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                                f"--master-port={port}", *target],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for rank in range(nodes)]
    results = []
    for agent in agents:
        stdout, stderr = agent.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    return results


def _check(results):
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _run(nproc, model_dir, data, components, out, tmp_path, shard="none", mode="lora", extra_env=None,
         overrides=None, nodes=1):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNISD_CACHE_DIR": str(tmp_path / "cache"), **(extra_env or {})}
    args = [str(model_dir), str(data), json.dumps(components), str(out), shard, mode, json.dumps(overrides or {})]
    _check(_launch([str(script), *args], nproc, env, nodes))
    return torch.load(out)


@pytest.mark.parametrize(
    ("components", "mode"),
    [({}, "lora"), ({"ema": {"sync_steps": 1, "beta": 0.5}}, "lora"), ({"ema": {"sync_steps": 1, "beta": 0.5}}, "full"),
     # token-level agreement normalises by a quantile over the *global* batch's tokens
     ({"agreement": {"num_contexts": 2, "builder": "random", "gamma": 5.0, "quantile": 0.5}}, "lora")],
    ids=["plain", "ema", "ema-full", "agreement"],
)
def test_two_processes_match_one(tmp_path, components, mode):
    """Plain data parallelism and FSDP sharding over 2 processes both reproduce the 1-process update."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    # A prompt prefix shared by the rows of a forward runs once, and one process's forwards hold other rows
    # than two processes' (examples 0, 1 against 0, 2), so float32 rounds differently. With agreement's
    # near-zero divergence that is 1e-4 of the gradient (itself 2.2e-4 from its float64 value, either way):
    # that case runs every row whole. The shared prefix is checked in float64 in test_shared_prefix.py.
    env = {"TEST_WHOLE_ROWS": "1"} if "agreement" in components else {}
    one = _run(1, model_dir, data, components, tmp_path / "one.pt", tmp_path, "none", mode, env)
    assert one["losses"][0] != one["losses"][1]
    # ZeRO-2 keeps blocks whole after forward: the adapter-off teacher (plain) and the EMA swap (ema)
    # must still reach the shards
    shardings = ["none", "fsdp"] + (["zero2"] if mode == "lora" and "agreement" not in components else [])
    for shard in shardings:
        if shard == "zero2":  # passed through from the launcher's environment (shard = "auto")
            two = _run(2, model_dir, data, components, tmp_path / "two-zero2.pt", tmp_path, "auto", mode,
                       {**ZERO2_ENV, **env})
        else:
            two = _run(2, model_dir, data, components, tmp_path / f"two-{shard}.pt", tmp_path, shard, mode, env)
        # abs: a near-zero divergence (full fine-tuning, one step from the teacher) carries fp32 round-off
        # of ~1e-8 from its O(1) log-prob terms, which a relative tolerance alone would call a mismatch.
        assert one["losses"] == pytest.approx(two["losses"], rel=1e-5, abs=1e-7), shard
        for step in range(2):
            for a, b in zip(one["grads"][step], two["grads"][step], strict=True):
                assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() <= 1e-5, shard
        for a, b in zip(one["params"], two["params"], strict=True):
            assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() <= 1e-5, shard
        assert one["generated"] == two["generated"], shard
        assert one["evaluated"] == two["evaluated"], shard
        assert two["evaluated"][:2] == [{"accuracy": 0.4, "extraction_rate": 1.0, "leakage": 0.0, "overrun": 0.0}, ["0", "1", "2", "3", "4"]]


def test_step_statistics_and_sequence_reduction_are_global(tmp_path):
    """A clip quantile over the step's divergences and the per-sequence reduction's sequence count are
    taken over every process: 2 processes give the 1-process update (issue 13, items 6 and 8)."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    components, overrides = {"clip": {"quantile": 0.6}}, {"loss_reduction": "sequence"}
    one = _run(1, model_dir, data, components, tmp_path / "one.pt", tmp_path, overrides=overrides)
    two = _run(2, model_dir, data, components, tmp_path / "two.pt", tmp_path, overrides=overrides)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    for step in range(2):
        for a, b in zip(one["grads"][step], two["grads"][step], strict=True):
            assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() <= 1e-5


def test_num_processes_flag_trains_with_two_processes(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unisd", "train", "--model", str(model_dir), "--data", str(data), "--steps", "2",
           "--batch-size", "2", "--grad-accum", "1", "--max-new-tokens", "4", "--output", str(out),
           "--num-processes", "2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # written once, by the main process
    assert (out / "final" / "adapter_model.safetensors").is_file()
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["cursor"] == 8  # 2 steps × global batch of 2 per process × 2 processes
    assert len(torch.load(out / "checkpoints" / "step-2" / "rng.pt", weights_only=False)) == 2
    # and it resumes on a different process count
    again = subprocess.run([sys.executable, "-m", "unisd", "train", "--resume", str(out), "--steps", "3"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize(("nproc", "shard", "batch_size"), [(1, "none", 2), (2, "hybrid", 2), (2, "hybrid", 1)],
                         ids=["2x1", "2x2-hybrid", "2x2-hybrid-2-micro-batches"])
def test_two_node_ranks_match_one_process(tmp_path, nproc, shard, batch_size):
    """Two node ranks (torchrun --nnodes 2, a local rendezvous): one process each, replicated; and two
    each with hybrid sharding (sharded within a node, replicated across nodes), which must really build
    a 2-D mesh, with one micro-batch per step and with two (the first skips gradient reduction). All
    give one process's weights."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    sizes = {"batch_size": batch_size}
    one = _run(1, model_dir, data, {}, tmp_path / "one.pt", tmp_path, overrides=sizes)
    nodes = _run(nproc, model_dir, data, {}, tmp_path / "nodes.pt", tmp_path, shard, overrides=sizes, nodes=2)
    assert one["losses"] == pytest.approx(nodes["losses"], rel=1e-5)  # a loss sums float32 round-off of O(1) terms
    for a, b in zip(one["params"], nodes["params"], strict=True):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() <= 1e-6
    assert one["generated"] == nodes["generated"] and one["evaluated"] == nodes["evaluated"]
    if shard == "hybrid":
        assert nodes["mesh"] == [[0, 1], [2, 3]]  # replicate across node ranks, shard within one
    else:
        assert nodes["mesh"] is None


def test_two_node_ranks_train_checkpoint_and_resume_on_one(tmp_path):
    """`unisd train` under torchrun --nnodes 2: the global rank 0 writes the run once, evaluates over
    both node ranks, and the run resumes in one process."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", toy_records(8))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNISD_CACHE_DIR": str(tmp_path / "cache")}
    train = ["-m", "unisd", "train", "--model", str(model_dir), "--data", str(data), "--steps", "2", "--batch-size",
             "2", "--grad-accum", "1", "--max-new-tokens", "4", "--output", str(out), "--save-every", "1"]
    results = _launch(train, 1, env, nodes=2)
    _check(results)
    assert "Done in" in results[0].stdout and "Done in" not in results[1].stdout  # one closing line, from rank 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["cursor"] == 8  # 2 steps × 2 per process × 2 node ranks
    assert len(torch.load(out / "checkpoints" / "step-2" / "rng.pt", weights_only=False)) == 2
    again = subprocess.run([sys.executable, "-m", "unisd", "train", "--resume", str(out), "--steps", "3"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


FIRST_START = textwrap.dedent('''
    import json, sys
    from unisd.config import RunConfig
    from unisd.data import example_file
    from unisd.io.reporting import Reporter
    from unisd.parallel import distributed
    from unisd.plugins import get_plugin_manager
    from unisd.run import build_run

    env = distributed.init_from_env()
    saved = []
    real_save = example_file._save
    example_file._save = lambda path, **arrays: saved.append(path.parent.name) or real_save(path, **arrays)
    run = build_run(RunConfig(model=sys.argv[1], data=sys.argv[2], max_prompt_tokens=40), get_plugin_manager(),
                    Reporter(), None)
    everyone = distributed.gather_objects([saved, len(run.examples)])
    if env.is_main:
        print("RESULT " + json.dumps(everyone))
    distributed.shutdown()
''')


def test_a_new_data_file_is_indexed_and_measured_by_one_process(tmp_path):
    """The first start on a JSONL file under 2 processes: the main process indexes it and measures its
    prompts; the other waits and reads both from the cache (and keeps the same examples)."""
    model_dir = make_tiny_model_dir(tmp_path / "model")
    records = toy_records(12)
    records[3]["prompt"] = "long " * 60  # over max_prompt_tokens: left out on both processes
    data = write_jsonl(tmp_path / "data.jsonl", records)
    script = tmp_path / "first_start.py"
    script.write_text(FIRST_START)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNISD_CACHE_DIR": str(tmp_path / "cache")}
    [result] = _launch([str(script), str(model_dir), str(data)], 2, env)
    _check([result])
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    (main_saved, main_count), (other_saved, other_count) = json.loads(line[len("RESULT "):])
    assert sorted(main_saved) == ["data-index", "data-index"] and other_saved == []
    assert main_count == other_count == 11


def test_more_processes_than_gpus_is_a_usage_error(monkeypatch):
    """Emulated CUDA with one GPU and two local processes: refused before any process group is started."""
    from unisd.errors import UsageError
    from unisd.parallel import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _: pytest.fail("picked a GPU"))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **_: pytest.fail("joined a group"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UsageError, match="2 processes on this machine but 1 GPU"):
        distributed.init_from_env()

"""Processes that share a machine share its cores (unisd.parallel.threads)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unisd.parallel import threads


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)


@pytest.mark.parametrize(("processes", "each"), [(1, 8), (2, 4), (3, 2), (8, 1), (16, 1)])
def test_the_cores_are_split_between_processes(eight_cores, processes, each):
    env = threads.share_threads({"PATH": "/bin"}, processes)
    assert env["OMP_NUM_THREADS"] == str(each)
    assert env["PATH"] == "/bin"


def test_a_users_thread_count_is_kept(eight_cores):
    assert threads.share_threads({"OMP_NUM_THREADS": "3"}, 2)["OMP_NUM_THREADS"] == "3"


def test_a_sweep_slots_share_is_split_again_by_num_processes(eight_cores):
    slot = threads.share_threads({}, 2)  # a sweep with two slots: 4 cores each
    assert (slot["OMP_NUM_THREADS"], slot[threads.BUDGET_VARIABLE]) == ("4", "4")
    assert threads.share_threads(slot, 2)["OMP_NUM_THREADS"] == "2"  # --num-processes 2 inside the slot
    assert threads.budget({threads.BUDGET_VARIABLE: "junk"}) == 8


def test_sweep_slots_on_one_cpu_share_it(eight_cores, monkeypatch):
    from unisd.ops.scheduler import slot_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.BUDGET_VARIABLE, raising=False)
    assert slot_env("cpu", 0, slots=2)["OMP_NUM_THREADS"] == "4"
    assert slot_env("0", 1, slots=4)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert slot_env("cpu", 0, slots=2)["OMP_NUM_THREADS"] == "5"


def test_torch_in_a_child_uses_its_share(monkeypatch):
    """The variable really reaches torch's thread pool in the child."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(threads.BUDGET_VARIABLE, "3")
    env = threads.share_threads(dict(__import__("os").environ), 3)
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "1", out.stderr[-2000:]


def test_num_processes_relaunch_gives_each_process_its_share(eight_cores, monkeypatch):
    from unisd.cli import train_cmd

    seen = {}

    def fake_call(cmd, env):
        seen.update(cmd=cmd, env=env)
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.BUDGET_VARIABLE, raising=False)
    monkeypatch.setattr(sys, "argv", ["unisd", "train", "--num-processes", "2", "--steps", "3"])
    assert train_cmd.relaunch(2) == 0
    assert seen["env"]["OMP_NUM_THREADS"] == "4"
    assert "--num-processes" not in seen["cmd"] and seen["cmd"][-2:] == ["--steps", "3"]

"""CPU threads for processes that share one machine.

torch gives every process as many compute threads as the machine has cores. Two processes that each do
so fight over the cores: their OpenMP threads spin while waiting for each other, and on a 2-core machine
two demo trainings side by side took 8× as long as with one thread each (bench/RESULTS.md). So whatever
starts several training processes on one machine (``unisd sweep`` with several slots, ``unisd train
--num-processes N``) gives each its share of the cores, unless the user has set ``OMP_NUM_THREADS``.

``UNISD_CPU_BUDGET`` carries a sweep slot's share down to ``--num-processes``, which splits it again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

BUDGET_VARIABLE = "UNISD_CPU_BUDGET"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def budget(env: Mapping[str, str]) -> int:
    """The cores a job may use: a sweep slot's share, else the whole machine."""
    given = env.get(BUDGET_VARIABLE, "")
    return int(given) if given.isdigit() and int(given) > 0 else usable_cores()


def share_threads(env: Mapping[str, str], processes: int) -> dict[str, str]:
    """``env`` for each of ``processes`` processes that run side by side within this job's budget: one
    ``processes``-th of the cores each (at least one). A user's own ``OMP_NUM_THREADS`` is kept, except
    where a sweep set it (the budget variable says so)."""
    out = dict(env)
    if "OMP_NUM_THREADS" in env and BUDGET_VARIABLE not in env:
        return out
    each = max(1, budget(env) // max(processes, 1))
    out["OMP_NUM_THREADS"] = str(each)
    out[BUDGET_VARIABLE] = str(each)
    return out

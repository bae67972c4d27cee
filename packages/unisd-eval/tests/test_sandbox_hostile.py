"""Hostile completions: none can forge a pass, reach the network, or leave anything behind.

Each case is a *wrong* solution (``add`` subtracts) plus an attack, scored against ``assert add(2, 3) == 5``
the way code tasks score completions; each asserts the exact verdict. A module fixture checks that the
whole suite left no SysV IPC object, no file in the shared directories and no sandbox process behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from unisd_eval.sandbox import (
    FAILED,
    PASSED,
    RESOURCE_LIMIT,
    UID_BASE,
    UID_SLOTS,
    Limits,
    Program,
    Sandbox,
    SandboxError,
    _uid_processes,
    privilege_drop_available,
)
from unisd_eval.tasks.humaneval import HumanEvalTask

WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\n"
SHARED = ("/dev/shm", "/run/lock", tempfile.gettempdir())


def _sysv_ids() -> set[str]:
    ids = set()
    for kind in ("shm", "sem", "msg"):
        try:
            rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        except OSError:
            continue
        ids |= {f"{kind}:{row.split()[1]}" for row in rows if row.split()}
    return ids


def _shared_entries() -> set[str]:
    found = set()
    for folder in SHARED:
        try:
            found |= {os.path.join(folder, name) for name in os.listdir(folder)}
        except OSError:
            continue
    return found


def _sandbox_processes() -> list[int]:
    return [pid for uid in range(UID_BASE, UID_BASE + UID_SLOTS) for pid in _uid_processes(uid)]


def _sandbox_dirs() -> set[str]:
    return {p for p in _shared_entries() if os.path.basename(p).startswith("unisd-sbx-")}


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind():
    ipc, dirs = _sysv_ids(), _sandbox_dirs()
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    lock = set(os.listdir("/run/lock")) if os.path.isdir("/run/lock") else set()
    yield
    assert _sysv_ids() - ipc == set(), "SysV IPC objects survived the hostile suite"
    assert _sandbox_dirs() - dirs == set(), "sandbox directories survived the hostile suite"
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) - shm == set()
    if os.path.isdir("/run/lock"):
        assert set(os.listdir("/run/lock")) - lock == set()
    assert _sandbox_processes() == []


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(timeout=5.0), workers=2)


def judged(sandbox: Sandbox, attack: str, solution: str = WRONG, tests: str = TESTS):
    return sandbox.run(Program(solution + textwrap.dedent(attack), tests=tests, entry_point="add"))


def isolated(sandbox: Sandbox) -> dict:
    return sandbox.describe()


# --- 1. the report channel ---------------------------------------------------------------------------

FD_FORGERY = """
import json, os, stat, struct
records = [b'{"done": true}\\n', json.dumps({"passed": True, "stage": "end", "error": None}).encode()]
for fd in range(3, 1024):
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        continue
    for record in records:
        for framed in (record, struct.pack(">I", len(record)) + record):
            try:
                os.write(fd, framed)
            except OSError:
                pass
"""


def test_writing_a_done_record_to_every_descriptor_then_exiting_0_fails(sandbox):
    result = judged(sandbox, FD_FORGERY + "os._exit(0)\n")
    assert result.verdict == FAILED, result


def test_forging_the_solutions_own_replies_cannot_skip_the_tests(sandbox):
    # The solution writes a well-formed "names" frame that hides `add`: the tests then fail by NameError.
    attack = """
    import json, os, struct
    def frame(message):
        data = json.dumps(message).encode()
        return struct.pack(">I", len(data)) + data
    for fd in range(3, 64):
        try:
            os.write(fd, frame({"ok": []}))
        except OSError:
            pass
    """
    result = judged(sandbox, attack)
    assert result.verdict == FAILED, result


def test_descriptors_of_other_processes_are_out_of_reach(sandbox):
    attack = """
    import os
    opened = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f'/proc/{pid}/fd'):
                try:
                    with open(f'/proc/{pid}/fd/{fd}', 'wb') as fh:
                        fh.write(b'{"passed": true}')
                    opened.append((pid, fd))
                except OSError:
                    pass
        except OSError:
            pass
    print('opened', opened)
    os._exit(0)
    """
    result = judged(sandbox, attack)
    assert result.verdict == FAILED, result


def test_reading_the_judges_memory_is_refused(sandbox):
    attack = """
    import os
    for pid in os.listdir('/proc'):
        if pid.isdigit() and int(pid) != os.getpid():
            for what in ('mem', 'environ', 'cmdline'):
                try:
                    data = open(f'/proc/{pid}/{what}', 'rb').read(4096)
                except OSError:
                    continue
    os._exit(0)
    """
    assert judged(sandbox, attack).verdict == FAILED


# --- 2. patching the runner's modules -----------------------------------------------------------------

def test_patching_json_os_sys_and_builtins_fails(sandbox):
    attack = """
    import builtins, json, os, struct, sys
    json.dumps = lambda *a, **k: '{"ok": [], "passed": true, "done": true}'
    json.loads = lambda *a, **k: {"ok": 5}
    os._exit = lambda code=0: None
    sys.exit = lambda code=0: None
    real_write = os.write
    os.write = lambda fd, data: real_write(fd, data.replace(b'"err"', b'"ok"'))
    builtins.AssertionError = type('AssertionError', (Exception,), {})
    struct.pack = lambda *a: b'\\x00\\x00\\x00\\x0b'
    """
    result = judged(sandbox, attack)
    assert result.verdict == FAILED, result


def test_exit_handlers_and_early_exits_fail(sandbox):
    attacks = [
        "import atexit, os\natexit.register(lambda: os.write(1, b'done'))\nraise SystemExit(0)\n",
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n",
    ]
    results = sandbox.run_many([Program(WRONG + a, tests=TESTS, entry_point="add") for a in attacks])
    assert [r.verdict for r in results[:3]] == [FAILED, FAILED, FAILED], results
    assert results[3].verdict in (FAILED, "crashed")  # SIGTERM to itself: killed, never passed


def test_exiting_inside_the_tested_call_is_not_swallowed_by_the_tests(sandbox):
    # The tests catch Exception to tolerate errors; an exit inside the call is not an Exception.
    solution = "import sys\ndef add(a, b):\n    sys.exit(0)\n"
    tests = "try:\n    r = add(2, 3)\nexcept Exception:\n    r = 5\nassert r == 5\n"
    result = sandbox.run(Program(solution, tests=tests, entry_point="add"))
    assert result.verdict == FAILED, result


def test_dying_inside_the_tested_call_is_not_swallowed_by_the_tests(sandbox):
    solution = "import os\ndef add(a, b):\n    os._exit(0)\n"
    tests = "try:\n    r = add(2, 3)\nexcept BaseException:\n    r = 5\nassert r == 5\n"
    result = sandbox.run(Program(solution, tests=tests, entry_point="add"))
    assert result.verdict == FAILED, result


def test_forking_does_not_help(sandbox):
    attack = """
    import os, time
    if os.fork() != 0:
        os._exit(0)  # the parent leaves; the child carries on as the solution (with the wrong add)
    """
    assert judged(sandbox, attack).verdict == FAILED


def test_shadowing_builtins_the_tests_use_fails(sandbox):
    attack = """
    def abs(x):
        return 0
    def isinstance(*args):
        return True
    """
    tests = "assert isinstance(add(2, 3), int)\nassert abs(add(2, 3) - 5) < 1e-9\n"
    assert judged(sandbox, attack, tests=tests).verdict == FAILED


def test_tests_still_see_the_solutions_helpers_and_exceptions(sandbox):
    solution = (
        "import collections\n"
        "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
        "def add(a, b):\n    if b is None:\n        raise ValueError('no b')\n    return a + b\n"
        "def pairs():\n    return [Pair(1, 2), Pair(3, 4)]\n"
        "def counts(s):\n    return collections.Counter(s)\n"
        "def halves(x):\n    return (x / 2 for _ in range(2))\n"
    )
    tests = (
        "assert add(2, 3) == 5 and add(2.5, 0.25) == 2.75 and add([1], [2]) == [1, 2]\n"
        "try:\n    add(1, None)\n    raise RuntimeError('expected ValueError')\nexcept ValueError as exc:\n    assert 'no b' in str(exc)\n"
        "assert [p.a + p.b for p in pairs()] == [3, 7]\n"
        "assert counts('aab') == {'a': 2, 'b': 1} and counts('aab')['a'] == 2\n"
        "assert list(halves(3)) == [1.5, 1.5] and abs(add(0.1, 0.2) - 0.3) < 1e-9\n"
        "assert add(10 ** 30, 1) == 10 ** 30 + 1 and add((1,), (2,)) == (1, 2)\n"
        "assert add(1, 2) is not None and isinstance(add('a', 'b'), str)\n"
    )
    result = sandbox.run(Program(solution, tests=tests, entry_point="add"))
    assert result.verdict == PASSED, result


# --- 3. the lock directory ---------------------------------------------------------------------------

ROOT_ONLY = pytest.mark.skipif(not privilege_drop_available(), reason="sandbox uid locks are used only as root")


@ROOT_ONLY
@pytest.mark.parametrize("plant", ["other-owner", "world-writable", "symlink"])
def test_planted_lock_directory_is_refused_and_nothing_is_truncated(tmp_path, monkeypatch, plant):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    base = tmp_path / "tmp"
    base.mkdir()
    locks = base / "unisd-sandbox-locks"
    if plant == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        locks.symlink_to(target)
    else:
        locks.mkdir(mode=0o700)
        for uid in range(UID_BASE, UID_BASE + UID_SLOTS):
            (locks / f"{uid}.lock").symlink_to(victim)
        if plant == "other-owner":
            os.chown(locks, 65534, 65534)
        else:
            os.chmod(locks, 0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    with pytest.raises(SandboxError, match="unisd-sandbox-locks"):
        Sandbox(Limits(timeout=5.0)).run(Program("x = 1"))
    assert victim.read_text() == "precious"


# --- 4. the network -----------------------------------------------------------------------------------

def test_no_tcp_connection_to_a_local_listener(sandbox):
    if isolated(sandbox).get("network") != "isolated":
        pytest.skip(f"this platform cannot isolate the network: {isolated(sandbox).get('why', 'not root')}")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    attack = f"""
    import socket
    s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
    s.sendall(b'exfiltrated')
    """
    result = judged(sandbox, attack)
    accepted = None
    try:
        accepted, _ = server.accept()
    except OSError:
        pass
    finally:
        server.close()
    assert accepted is None
    assert result.verdict == FAILED and "unreachable" in result.error, result


def test_udp_and_listening_stay_inside(sandbox):
    if isolated(sandbox).get("network") != "isolated":
        pytest.skip("this platform cannot isolate the network")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.2)
    port = receiver.getsockname()[1]
    attack = f"""
    import socket
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.sendto(b'exfiltrated', ('127.0.0.1', {port}))
    """
    result = judged(sandbox, attack)
    with pytest.raises(OSError):
        receiver.recv(64)
    receiver.close()
    assert result.verdict == FAILED and "unreachable" in result.error


# --- 5. nothing outlives a run ------------------------------------------------------------------------

def test_sysv_shared_memory_is_gone_after_the_run(sandbox):
    attack = """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for _ in range(2):
        ident = libc.shmget(0, 64 << 20, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
        assert ident >= 0, ctypes.get_errno()
    """
    before = _sysv_ids()
    result = judged(sandbox, attack)
    assert result.verdict == FAILED, result  # the segments were made; add is still wrong
    assert _sysv_ids() - before == set()


def test_files_in_shared_directories_are_gone_and_capped(sandbox):
    attack = """
    import os
    for folder in ('/dev/shm', '/run/lock', '/tmp', '/var/tmp'):
        try:
            open(os.path.join(folder, 'unisd-hostile-left'), 'w').write('x')
        except OSError:
            pass
    chunk = b'0' * (1 << 20)
    written = 0
    try:
        for i in range(1024):
            with open(f'/dev/shm/fill-{i}', 'wb') as fh:
                fh.write(chunk * 8)
            written += 8
    finally:
        print('written MB', written)
    """
    if isolated(sandbox).get("filesystem", "shared") == "shared":
        pytest.skip("no private filesystem here: files are removed by uid, but there is no total cap")
    result = judged(sandbox, attack)
    assert result.verdict == RESOURCE_LIMIT and "No space left" in result.error, result
    assert int(result.stdout.split()[-1]) <= 64
    for folder in ("/dev/shm", "/run/lock", "/tmp", "/var/tmp"):
        assert not os.path.exists(os.path.join(folder, "unisd-hostile-left"))


def test_detached_grandchildren_do_not_survive(sandbox):
    attack = """
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(60)
        os._exit(0)
    time.sleep(0.2)
    """
    result = judged(sandbox, attack)
    assert result.verdict == FAILED
    assert _sandbox_processes() == []


SLEEPER = "```python\nimport os, time\nif os.fork() == 0:\n    time.sleep(60)\ntime.sleep(60)\n```"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_unisd_eval_mid_run_leaves_nothing(sig, tmp_path):
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text("".join(json.dumps({"id": f"HumanEval/{i}", "completion": SLEEPER}) + "\n" for i in range(2)))
    command = [sys.executable, "-m", "unisd", "eval", "humaneval", "--predictions", str(predictions),
               "--limit", "2", "--output", str(tmp_path / "out")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not _sandbox_processes() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5 if privilege_drop_available() else 5)
    if privilege_drop_available():
        assert _sandbox_processes(), "the programs never started"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    deadline = time.time() + 5
    while _sandbox_processes() and time.time() < deadline:
        time.sleep(0.05)
    assert _sandbox_processes() == []
    if sig == signal.SIGTERM:
        assert proc.returncode != 0
    else:  # a killed process cleans nothing itself: the next evaluation sweeps its directories
        from unisd_eval.sandbox import remove_stale_directories

        remove_stale_directories()
    assert [p for p in _sandbox_dirs() if f"-{proc.pid}-" in os.path.basename(p)] == []
    assert not (tmp_path / "out" / "results.json").exists()  # nothing written half-way


# --- 6. odd completions -------------------------------------------------------------------------------

def test_a_lone_surrogate_is_that_items_failure(sandbox):
    task = HumanEvalTask(sandbox)
    from unisd.data.tasks import Example

    example = Example(id="t/0", prompt="", reference="", meta={
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"})
    scores = task.score_batch([example, example], ["def add(a, b):\n    return '\ud800'\n",
                                                   "def add(a, b):\n    return a + b\n"])
    assert [s.verdict for s in scores] == [FAILED, PASSED]
    assert "surrogate" in scores[0].error or "encode" in scores[0].error


# --- 8. labels ----------------------------------------------------------------------------------------

def test_thread_bomb_is_a_resource_limit(sandbox):
    attack = """
    import threading, time
    threads = []
    for _ in range(1000):
        t = threading.Thread(target=time.sleep, args=(5,), daemon=True)
        t.start()
        threads.append(t)
    """
    result = judged(sandbox, attack)
    assert result.verdict == RESOURCE_LIMIT, result
    assert "thread" in result.error


def test_stderr_flood_keeps_its_report(sandbox):
    attack = """
    import sys
    while True:
        sys.stderr.write('x' * 65536)
    """
    result = judged(sandbox, attack)
    assert result.verdict == RESOURCE_LIMIT, result
    assert "File too large" in result.error


def test_a_concurrent_attacker_thread_cannot_pass_for_the_solution(sandbox):
    # A thread left running by the solution keeps writing forged frames while the tests run.
    attack = FD_FORGERY.replace("import json", "import threading, json", 1) + textwrap.dedent("""
    def spam():
        while True:
            for fd in range(3, 16):
                try:
                    os.write(fd, b'\\x00\\x00\\x00\\x0b{"ok": 5}')
                except OSError:
                    pass
    threading.Thread(target=spam, daemon=True).start()
    """)
    results = [judged(sandbox, attack) for _ in range(2)]
    assert all(r.verdict != PASSED for r in results), results


def test_the_judge_is_not_fooled_by_time(sandbox):
    # A slow but correct solution passes; the same, timed out, does not.
    slow = "import time\ndef add(a, b):\n    time.sleep(0.5)\n    return a + b\n"
    assert sandbox.run(Program(slow, tests=TESTS, entry_point="add")).verdict == PASSED
    quick = Sandbox(Limits(timeout=0.3))
    assert quick.run(Program(slow, tests=TESTS, entry_point="add")).verdict == "timeout"


def test_thread_safety_of_run_many_order():
    sandbox = Sandbox(Limits(timeout=5.0), workers=3)
    programs = [Program(f"def add(a, b):\n    return a + b + {i % 2}\n", tests=TESTS, entry_point="add") for i in range(6)]
    verdicts = [r.verdict for r in sandbox.run_many(programs)]
    assert verdicts == [PASSED, FAILED] * 3
    assert threading.active_count() >= 1

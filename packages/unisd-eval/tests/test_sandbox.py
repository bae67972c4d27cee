"""The sandbox contains hostile programs and reports each with the right verdict."""

from __future__ import annotations

import os
import signal

import pytest

from unisd_eval.sandbox import (
    CRASHED,
    FAILED,
    PASSED,
    RESOURCE_LIMIT,
    TIMEOUT,
    UID_BASE,
    UID_SLOTS,
    Limits,
    Sandbox,
    _uid_processes,
    privilege_drop_available,
)

ROOT_ONLY = pytest.mark.skipif(
    not privilege_drop_available(),
    reason="containing absolute-path writes and signals needs a separate uid (run as root); not root here",
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(Limits(timeout=5.0), workers=2)


def _leftover_sandbox_processes() -> list[int]:
    return [pid for uid in range(UID_BASE, UID_BASE + UID_SLOTS) for pid in _uid_processes(uid)]


def test_passing_program_passes(sandbox):
    result = sandbox.run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result.verdict == PASSED, result
    assert result.stdout.strip() == "ok"


def test_failing_assert_fails_with_message(sandbox):
    result = sandbox.run("assert 1 + 1 == 3, 'math is broken'\n")
    assert result.verdict == FAILED
    assert "AssertionError: math is broken" in result.error


def test_infinite_loop_times_out():
    result = Sandbox(Limits(timeout=1.5)).run("while True:\n    pass\n")
    assert result.verdict == TIMEOUT
    assert result.duration < 10


def test_allocating_8gb_hits_the_memory_limit(sandbox):
    result = sandbox.run("blob = bytearray(8 * 1024 ** 3)\nassert len(blob) > 0\n")
    assert result.verdict == RESOURCE_LIMIT, result
    assert "memory" in result.error


def test_fork_bomb_is_bounded_and_cleaned_up(sandbox):
    # Bounded on purpose (200 children at most) so a broken limit cannot take the shared machine down.
    bomb = (
        "import os, time\n"
        "for _ in range(200):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(20)\n"
        "        os._exit(0)\n"
    )
    result = sandbox.run(bomb)
    assert result.verdict == RESOURCE_LIMIT, result
    assert "Resource temporarily unavailable" in result.error or "BlockingIOError" in result.error
    if privilege_drop_available():
        assert _leftover_sandbox_processes() == []  # the sleeping children were killed with the run


def test_writing_a_1gb_file_hits_the_file_size_limit(sandbox):
    program = (
        "chunk = b'0' * (1 << 20)\n"
        "with open('big.bin', 'wb') as fh:\n"
        "    for _ in range(1024):\n"
        "        fh.write(chunk)\n"
    )
    result = sandbox.run(program)
    assert result.verdict == RESOURCE_LIMIT, result
    assert "File too large" in result.error


@ROOT_ONLY
def test_writing_outside_the_temp_dir_is_refused(sandbox, tmp_path):
    target = tmp_path / "outside.txt"
    result = sandbox.run(f"open({str(target)!r}, 'w').write('pwned')\n")
    assert result.verdict == FAILED
    # Refused by the uid, or not even visible (under namespaces the program has a /tmp of its own).
    assert "PermissionError" in result.error or "FileNotFoundError" in result.error
    assert not target.exists()


def test_environment_secret_is_not_inherited(sandbox, monkeypatch):
    monkeypatch.setenv("UNISD_TEST_SECRET", "s3cr3t-value")
    program = (
        "import os\n"
        "print(repr(os.environ.get('UNISD_TEST_SECRET')))\n"
        "print(sorted(os.environ))\n"
        f"try:\n    leaked = open('/proc/{os.getpid()}/environ', 'rb').read()\n"
        "except OSError:\n    leaked = b''\n"
        "print(b's3cr3t' in leaked)\n"
    )
    result = sandbox.run(program)
    assert result.verdict == PASSED, result
    assert "s3cr3t" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "None"
    assert lines[2] == "False"


def test_killing_the_parent_does_not_kill_the_caller(sandbox):
    result = sandbox.run("import os, time\nos.kill(os.getppid(), 9)\ntime.sleep(0.5)\n")
    assert result.verdict == CRASHED, result
    os.kill(os.getpid(), 0)  # still alive


@ROOT_ONLY
def test_signalling_the_caller_directly_is_refused(sandbox):
    result = sandbox.run(f"import os\nos.kill({os.getpid()}, {int(signal.SIGKILL)})\n")
    assert result.verdict == FAILED
    # Another uid's process, or (in a PID namespace of its own) no process of that number at all.
    assert "PermissionError" in result.error or "ProcessLookupError" in result.error


def test_sys_exit_before_the_asserts_does_not_pass(sandbox):
    program = "def f():\n    return 1\nimport sys\nsys.exit(0)\nassert f() == 2\n"
    result = sandbox.run(program)
    assert result.verdict == FAILED
    assert "before it finished" in result.error


def test_os_exit_before_the_asserts_does_not_pass(sandbox):
    result = sandbox.run("import os\nos._exit(0)\nassert False\n")
    assert result.verdict == FAILED


def test_deleting_the_callers_files_is_contained(sandbox, tmp_path, monkeypatch):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    monkeypatch.chdir(tmp_path)
    program = (
        "import os, shutil\n"
        "print(os.getcwd())\n"
        "for name in ('keep.txt',):\n"
        "    try:\n        os.remove(name)\n    except OSError as e:\n        print('relative', type(e).__name__)\n"
        f"shutil.rmtree({str(tmp_path)!r}, ignore_errors=True)\n"
        f"os.remove({str(keep)!r})\n"
    )
    result = sandbox.run("open('marker-left-behind', 'w').write('x')\n" + program)
    if privilege_drop_available():
        assert result.verdict == FAILED
        assert "PermissionError" in result.error or "FileNotFoundError" in result.error
        assert keep.read_text() == "precious"
    workdir = result.stdout.splitlines()[0]
    assert workdir != str(tmp_path)  # the program ran in its own directory ...
    assert not os.path.exists(os.path.join(workdir, "marker-left-behind"))  # ... which is gone afterwards


def test_output_is_truncated():
    result = Sandbox(Limits(timeout=5.0, max_output=100)).run("print('x' * 100000)\n")
    assert result.verdict == PASSED
    assert len(result.stdout) < 200 and result.stdout.endswith("[... truncated]")


def test_segfault_is_a_crash(sandbox):
    result = sandbox.run("import ctypes\nctypes.string_at(0)\n")
    assert result.verdict == CRASHED


def test_run_many_keeps_order(sandbox):
    programs = ["assert True\n", "assert False\n", "x = 1\n", "raise ValueError('v')\n"]
    verdicts = [r.verdict for r in sandbox.run_many(programs)]
    assert verdicts == [PASSED, FAILED, PASSED, FAILED]


@ROOT_ONLY
def test_files_left_in_world_writable_dirs_are_removed(sandbox):
    import secrets

    path = f"/tmp/unisd-escape-{secrets.token_hex(4)}.txt"
    result = sandbox.run(f"open({path!r}, 'w').write('left behind')\n")
    assert result.verdict == PASSED
    assert not os.path.exists(path)

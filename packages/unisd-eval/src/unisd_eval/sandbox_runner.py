"""The program that runs *inside* the sandbox process (passed to the interpreter with ``-c``).

It is kept as source text, not imported, because the sandboxed interpreter may be a different Python
(the unprivileged user cannot always read our virtual environment) and must not import unisd.

Protocol. argv: ``[-c, LIMITS_JSON, PROGRAM_PATH, RESULT_FD]``. The runner

1. lowers its own resource limits (CPU, address space, processes, file size, open files, core);
2. forks: the *child* runs the program, the *intermediate* (this process) only waits. A program that
   kills its parent (``os.kill(os.getppid(), 9)``) kills this disposable intermediate, never the caller;
3. the intermediate reads the per-run token from stdin *after* the fork, so the program's process never
   holds it, waits for the child, and writes one JSON report (with the token) to RESULT_FD, a file the
   child closed before running anything.

The child reports on a private pipe: ``{"done": true}`` only when the whole program (solution plus
tests) ran to its end; ``{"exc": ...}`` for an exception, including ``SystemExit`` — so ``sys.exit(0)``
before the asserts is a failure, and ``os._exit(0)`` (no report at all) is one too.
"""

RUNNER_SOURCE = r'''
import json, os, resource, sys

def _limits(spec):
    pairs = {
        "cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS, "nproc": resource.RLIMIT_NPROC,
        "fsize": resource.RLIMIT_FSIZE, "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE,
    }
    for key, which in pairs.items():
        value = spec.get(key)
        if value is None:
            continue
        soft = hard = int(value)
        if key == "cpu":
            hard = soft + 1  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.setrlimit(which, (soft, hard))

def _child(prog, w):
    me = os.getpid()
    code = 1
    msg = None
    try:
        with open(prog, encoding="utf-8") as fh:
            src = fh.read()
        namespace = {"__name__": "__main__", "__file__": prog, "__builtins__": __builtins__}
        sys.argv = [prog]
        exec(compile(src, prog, "exec"), namespace)
        msg = {"done": True}
        code = 0
    except SystemExit as exc:
        msg = {"exc": "SystemExit", "errno": None,
               "message": "the program exited (code %r) before it finished" % (exc.code,)}
    except BaseException as exc:
        import traceback
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # without our frame
        msg = {"exc": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc)[:1000]}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    if os.getpid() == me:  # processes the program forked do not report
        try:
            os.write(w, (json.dumps(msg) + "\n").encode())
        except BaseException:
            pass
    os._exit(code)

def _main():
    spec = json.loads(sys.argv[1])
    prog, result_fd = sys.argv[2], int(sys.argv[3])
    _limits(spec)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(result_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        _child(prog, w)
    os.close(w)
    token = sys.stdin.readline().strip()
    _, status = os.waitpid(pid, 0)
    os.set_blocking(r, False)
    data = b""
    try:
        while len(data) < 65536:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    report = {"token": token, "exit": os.waitstatus_to_exitcode(status), "child": None}
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            report["child"] = json.loads(line)
            break
        except ValueError:
            continue
    os.write(result_fd, json.dumps(report).encode())
    os._exit(0)

_main()
'''

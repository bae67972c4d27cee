"""The judge: the program that runs *inside* the sandbox, in a fresh interpreter (``python -I -c SOURCE``).

unisd never imports this module to run it: :mod:`unisd_eval.sandbox` reads its text and hands it to the
sandbox interpreter, which may be another Python than ours (the unprivileged user cannot always read our
virtual environment). It therefore imports nothing outside the standard library.

Why two processes. A verdict written by the process that ran the scored code is worth nothing: that code
can write to any descriptor it finds, replace ``json.dumps`` or ``os._exit``, register exit handlers, or
exit early with status 0. So the scored code (the *solution*) and the tests never share a process:

- the **judge** (this process, trusted) holds the report descriptor and the per-run token, runs the task's
  setup and test code, and writes the one report the caller believes;
- the **solution process** (forked from the judge before it reads the token, untrusted) runs the
  completion, then only answers the judge's requests: "call this function with these arguments", "get this
  attribute", "compare", ... Values cross the pipe as *data* (None, bool, int, float, complex, str, bytes,
  and lists, tuples, sets, dicts of them); anything else stays in the solution process and the judge holds
  a handle to it, every use of which is another request.

The solution process never holds the report descriptor or the token, cannot trace or read the judge
(the judge is not dumpable, and under namespaces not even visible to it), and whatever it sends is parsed
as data, never as code. A test passes only when the judge ran every test statement to its end; a solution
that dies, closes its channel or breaks the protocol fails.

argv: ``[-c, SPEC_JSON, JOB_PATH, RESULT_FD]``; the token arrives on stdin after the fork.
SPEC: ``{"limits": {...rlimits}, "uid": int|None, "isolate": bool, "disk_bytes": int, "keep": [paths]}``.
JOB: ``{"solution": str, "setup": str, "tests": str|None, "entry_point": str|None}``.
"""

import builtins
import json
import operator
import os
import resource
import signal
import struct
import sys

PROGRAM_NAME = "program.py"
MAX_FRAME = 64 << 20  # bytes of one message from the solution; more is a protocol violation
MAX_DEPTH = 100  # nesting encoded as data; deeper values stay in the solution process as handles

# --------------------------------------------------------------------------------------------------
# Isolation (run by the judge before the fork, while it may still be root)
# --------------------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x08000000, 0x40000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE = 1, 4
SHARED_DIRS = ("/dev/shm", "/run/lock", "/var/tmp", "/tmp")  # /tmp last: binding it hides paths under it


def _libc():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True), ctypes
    except Exception:  # noqa: BLE001 - a Python without ctypes: no namespaces, no prctl
        return None, None


def _check(rc, ctypes, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def isolate(spec, workdir):
    """Namespaces (as root): no network, private SysV IPC, a size-capped private /tmp and /dev/shm.

    Returns what holds, for the report. Every step that fails leaves the run un-isolated in that
    respect, and says so, rather than stopping it.
    """
    state = {"network": "open", "ipc": "shared", "filesystem": "shared", "processes": "shared"}
    libc, ctypes = _libc()
    if not spec.get("isolate") or libc is None or os.geteuid() != 0:
        return state, workdir
    try:
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWPID), ctypes, "unshare")
    except OSError as exc:
        state["why"] = str(exc)
        return state, workdir
    state.update(network="isolated", ipc="private", processes="private")
    try:
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), ctypes, "mount --make-rprivate /")
        uid = spec.get("uid")
        owner = f",uid={uid},gid={uid}" if uid is not None else ""
        options = (f"size={spec['disk_bytes']},mode=0700{owner}").encode()
        _check(libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), ctypes, "mount tmpfs")
        keep = [os.path.realpath(p) for p in spec.get("keep", [])]
        for target in SHARED_DIRS:
            real = os.path.realpath(target)
            if not os.path.isdir(real) or any(k == real or k.startswith(real + "/") for k in keep):
                continue  # e.g. the interpreter itself lives under /tmp: keep that directory visible
            source = os.path.join(workdir, real.strip("/").replace("/", "-"))
            os.mkdir(source, 0o700)
            if uid is not None:
                os.chown(source, uid, uid)
            _check(libc.mount(source.encode(), real.encode(), None, MS_BIND, None), ctypes, "bind " + real)
        state["filesystem"] = f"private, {spec['disk_bytes']} bytes in all"
        home = "/tmp" if os.path.realpath("/tmp") not in keep else workdir
        return state, home
    except OSError as exc:
        state["why"] = str(exc)
        return state, workdir


def drop_privileges(uid):
    if uid is None or os.geteuid() != 0:
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def harden(parent):
    """Not dumpable (no ptrace, no /proc/PID/fd or mem for same-uid processes); die with the parent."""
    libc, _ = _libc()
    if libc is not None:
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(3)  # the parent died before the death signal was armed


def set_limits(spec):
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


# --------------------------------------------------------------------------------------------------
# Framing: 4-byte big-endian length, then one JSON document
# --------------------------------------------------------------------------------------------------

class ChannelClosed(Exception):
    """The other end closed its pipe (or it broke)."""


# The functions below take their helpers as default arguments, bound when this file is compiled: a
# solution that replaces json.dumps or os.write afterwards does not change how its own process answers
# (which only matters for labelling its failures: the judge never takes a pass from it).

def send(fd, message, _dumps=json.dumps, _pack=struct.pack, _write=os.write):
    data = _dumps(message, ensure_ascii=True, allow_nan=True).encode("ascii")
    data = _pack(">I", len(data)) + data
    view = memoryview(data)
    while view:
        try:
            written = _write(fd, view)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        view = view[written:]


def _read_exactly(fd, n, _read=os.read):
    chunks, left = [], n
    while left:
        try:
            chunk = _read(fd, min(left, 1 << 20))
        except OSError as exc:
            raise ChannelClosed(str(exc)) from None
        if not chunk:
            raise ChannelClosed("end of file")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd, limit=MAX_FRAME, _loads=json.loads, _unpack=struct.unpack):
    (size,) = _unpack(">I", _read_exactly(fd, 4))
    if size > limit:
        raise ProtocolViolation(f"a message of {size} bytes (limit {limit})")
    try:
        return _loads(_read_exactly(fd, size).decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolViolation(f"an unreadable message ({type(exc).__name__})") from None


# --------------------------------------------------------------------------------------------------
# The solution process (untrusted): run the completion, then answer requests
# --------------------------------------------------------------------------------------------------

OPERATIONS = {
    "call": lambda obj, *args, **kwargs: obj(*args, **kwargs),
    "getattr": getattr, "setattr": setattr, "delattr": delattr,
    "len": len, "iter": iter, "next": next, "bool": bool, "hash": hash, "str": str, "repr": repr,
    "format": format, "float": float, "int": int, "complex": complex, "index": operator.index,
    "round": round, "abs": abs, "neg": operator.neg, "pos": operator.pos, "invert": operator.invert,
    "getitem": operator.getitem, "setitem": operator.setitem, "delitem": operator.delitem,
    "contains": operator.contains, "reversed": reversed, "enter": lambda obj: obj.__enter__(),
    "exit": lambda obj, *args: obj.__exit__(*args),
}
BINARY = ("eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow",
          "matmul", "lshift", "rshift", "and_", "or_", "xor")
for _name in BINARY:
    OPERATIONS[_name] = getattr(operator, _name)
OPERATIONS["divmod"] = divmod


class _Handles:
    """Objects that stay in the solution process; the judge refers to them by number."""

    def __init__(self):
        self.objects = {}

    def as_handle(self, obj):
        key = len(self.objects) + 1
        self.objects[key] = obj
        return ["h", key]


def encode(value, other, depth=0):
    """Exact built-in data by value; anything else goes to ``other(value)`` (a handle, or an error).

    Both sides use it: the solution process turns other values into handles to its own objects (also
    what nests deeper than MAX_DEPTH), the judge sends its handles back and refuses anything else.
    """
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -(1 << 53) < value < (1 << 53) else ["i", hex(value)]
    if kind is float:
        return ["f", value.hex()]
    if depth < MAX_DEPTH:
        if kind is list or kind is tuple or kind is set or kind is frozenset:
            tag = {list: "l", tuple: "t", set: "s", frozenset: "fs"}[kind]
            return [tag, [encode(item, other, depth + 1) for item in value]]
        if kind is dict:
            return ["d", [[encode(k, other, depth + 1), encode(v, other, depth + 1)] for k, v in value.items()]]
        if kind is complex:
            return ["c", value.real.hex(), value.imag.hex()]
        if kind is bytes or kind is bytearray:
            return ["b" if kind is bytes else "ba", value.hex()]
    return other(value)


def decode_in_solution(data, handles):
    """The judge's arguments (trusted data, or handles to our own objects)."""
    if not isinstance(data, list):
        return data
    tag = data[0]
    if tag == "h":
        return handles.objects[data[1]]
    if tag == "i":
        return int(data[1], 16)
    if tag == "f":
        return float.fromhex(data[1])
    if tag == "c":
        return complex(float.fromhex(data[1]), float.fromhex(data[2]))
    if tag in ("b", "ba"):
        return (bytes if tag == "b" else bytearray).fromhex(data[1])
    if tag == "d":
        return {decode_in_solution(k, handles): decode_in_solution(v, handles) for k, v in data[1]}
    items = [decode_in_solution(item, handles) for item in data[1]]
    return {"l": list, "t": tuple, "s": set, "fs": frozenset}[tag](items)


def describe_exception(exc):
    return {"exc": type(exc).__name__, "errno": getattr(exc, "errno", None) if isinstance(exc, OSError) else None,
            "message": str(exc)[:1000], "base": not isinstance(exc, Exception)}


def flush_output():
    """Flush what print() buffered: the processes end with os._exit (or a kill), which would drop it."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a full disk or a replaced stream must not stop the run
            pass


def _print_traceback(exc):
    try:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - stderr may be full (file-size limit) or replaced
        pass


def serve_solution(job, requests, replies, _exit=os._exit):
    """The solution process: run the completion and the setup, report the names, answer requests."""
    handles = _Handles()
    namespace = {"__name__": "__main__", "__file__": os.path.abspath(PROGRAM_NAME), "__builtins__": builtins}
    sys.argv = [namespace["__file__"]]
    try:
        source = job["solution"] + "\n" + job["setup"]
        exec(compile(source, namespace["__file__"], "exec"), namespace)
        names = [[k, encode(v, handles.as_handle)] for k, v in list(namespace.items())
                 if not (k.startswith("__") and k.endswith("__"))]
        flush_output()
        send(replies, {"ok": names})
    except BaseException as exc:  # noqa: BLE001 - SystemExit included: exiting early is a failure
        _print_traceback(exc)
        _report_and_exit(replies, exc)
    while True:
        try:
            request = receive(requests)
        except (ChannelClosed, ProtocolViolation):
            _exit(0)
        try:
            target = handles.objects[request["h"]]
            args = [decode_in_solution(a, handles) for a in request.get("args", [])]
            kwargs = {k: decode_in_solution(v, handles) for k, v in request.get("kwargs", [])}
            result = OPERATIONS[request["op"]](target, *args, **kwargs)
            reply = {"ok": encode(result, handles.as_handle)}
        except BaseException as exc:  # noqa: BLE001 - the judge decides what an exception means
            reply = {"err": describe_exception(exc)}
            if reply["err"]["base"] and not isinstance(exc, StopIteration):
                _print_traceback(exc)
                _report_and_exit(replies, exc)
        flush_output()
        try:
            send(replies, reply)
        except ChannelClosed:
            _exit(0)


def _report_and_exit(replies, exc, _exit=os._exit):
    flush_output()
    try:
        send(replies, {"err": describe_exception(exc)})
    except BaseException:  # noqa: BLE001
        pass
    _exit(1)


# --------------------------------------------------------------------------------------------------
# The judge (trusted): run setup and tests against the solution through handles
# --------------------------------------------------------------------------------------------------

class ProtocolViolation(Exception):
    """The solution process sent something that is not a valid reply."""


class SolutionLost(BaseException):
    """The solution process died or stopped answering. A BaseException so that tests which catch
    ``Exception`` (e.g. to expect a ValueError) cannot swallow it and go on to pass."""


class SolutionExited(BaseException):
    """The solution raised SystemExit / KeyboardInterrupt / GeneratorExit while answering a call."""


class SolutionError(Exception):
    """The solution raised an exception whose type is not a built-in exception."""


_EXCEPTIONS = {name: obj for name, obj in vars(builtins).items()
               if isinstance(obj, type) and issubclass(obj, Exception)}


class Solution:
    """The judge's side of the channel; counts violations so a verdict can never ignore one."""

    def __init__(self, pid, requests, replies):
        self.pid, self.requests, self.replies = pid, requests, replies
        self.broken = None  # why the channel can no longer be trusted, once it cannot

    def ask(self, op, handle, args=(), kwargs=None):
        if self.broken:
            raise SolutionLost(self.broken)
        try:
            send(self.requests, {"op": op, "h": handle, "args": [self.encode(a) for a in args],
                                 "kwargs": [[k, self.encode(v)] for k, v in (kwargs or {}).items()]})
            reply = receive(self.replies)
        except ChannelClosed as exc:
            self.broken = f"the solution process stopped answering ({exc})"
            raise SolutionLost(self.broken) from None
        except ProtocolViolation as exc:
            self.broken = f"protocol violation: {exc}"
            raise SolutionLost(self.broken) from None
        return self.unpack(reply)

    def unpack(self, reply):
        try:
            if isinstance(reply, dict) and set(reply) == {"ok"}:
                return self.decode(reply["ok"], 0)
            if isinstance(reply, dict) and set(reply) == {"err"} and isinstance(reply["err"], dict):
                err = reply["err"]
                name, message = str(err.get("exc")), str(err.get("message"))
            else:
                raise ProtocolViolation("a reply that is neither a value nor an error")
        except (ProtocolViolation, RecursionError, ValueError, TypeError, KeyError, IndexError) as exc:
            self.broken = f"protocol violation: {exc}"
            raise SolutionLost(self.broken) from None
        if err.get("base") and name != "StopIteration":
            exc = SolutionExited(f"{name}: {message}")
        elif name in _EXCEPTIONS and name not in ("BaseExceptionGroup", "ExceptionGroup"):
            exc = _EXCEPTIONS[name](message)  # the same type, so tests that expect e.g. ValueError work
        else:
            exc = SolutionError(f"{name}: {message}")
        exc._unisd_remote = _clean(err)
        raise exc

    def encode(self, value):
        return encode(value, self._handle_or_refuse)

    @staticmethod
    def _handle_or_refuse(value):
        if type(value) is Remote:
            return ["h", object.__getattribute__(value, "_handle")]
        raise TypeError(f"the tests passed a {type(value).__name__} to the sandboxed solution; only plain data "
                        "(numbers, strings, bytes, lists, tuples, sets, dicts, not nested deeper than "
                        f"{MAX_DEPTH} levels) and the solution's own objects can cross into it")

    def decode(self, data, depth):
        """Strictly parse a value from the solution: data or handles, never code."""
        if depth > MAX_DEPTH + 2:
            raise ProtocolViolation("a value nested too deep")
        if data is None or isinstance(data, (bool, str)):
            return data
        if type(data) is int:
            return data
        if type(data) is not list or not data or not isinstance(data[0], str):
            raise ProtocolViolation("an unknown value encoding")
        tag, rest = data[0], data[1:]
        if tag == "h" and len(rest) == 1 and type(rest[0]) is int:
            return Remote(self, rest[0])
        if tag in ("i", "f", "b", "ba", "c"):
            return _decode_hex(tag, rest)
        if tag in ("l", "t", "s", "fs", "d") and len(rest) == 1 and type(rest[0]) is list:
            return self._decode_collection(tag, rest[0], depth)
        raise ProtocolViolation("an unknown value encoding")

    def _decode_collection(self, tag, items, depth):
        """A list, tuple, set, frozenset or dict (its entries as [key, value] pairs), each item decoded."""
        if tag == "d":
            pairs = []
            for pair in items:
                if type(pair) is not list or len(pair) != 2:
                    raise ProtocolViolation("a malformed dict entry")
                pairs.append((self.decode(pair[0], depth + 1), self.decode(pair[1], depth + 1)))
            return dict(pairs)
        items = [self.decode(item, depth + 1) for item in items]
        return {"l": list, "t": tuple, "s": set, "fs": frozenset}[tag](items)


def _decode_hex(tag, rest):
    """A big int, float, complex or bytes value, sent as hex text (exact, and parsed as a number only)."""
    if tag in ("i", "f", "b", "ba") and len(rest) == 1 and isinstance(rest[0], str):
        text = rest[0]
        if tag == "i":
            return int(text, 16)
        if tag == "f":
            return float.fromhex(text)
        return (bytes if tag == "b" else bytearray).fromhex(text)
    if tag == "c" and len(rest) == 2 and all(isinstance(r, str) for r in rest):
        return complex(float.fromhex(rest[0]), float.fromhex(rest[1]))
    raise ProtocolViolation("an unknown value encoding")


def _ask(remote, op, args=(), kwargs=None):
    solution = object.__getattribute__(remote, "_solution")
    return solution.ask(op, object.__getattribute__(remote, "_handle"), args, kwargs)


class Remote:
    """A value that lives in the solution process; every use is a request to it."""

    __slots__ = ("_solution", "_handle")

    def __init__(self, solution, handle):
        object.__setattr__(self, "_solution", solution)
        object.__setattr__(self, "_handle", handle)

    def __getattr__(self, name):
        return _ask(self, "getattr", (name,))

    def __setattr__(self, name, value):
        _ask(self, "setattr", (name, value))

    def __delattr__(self, name):
        _ask(self, "delattr", (name,))

    def __call__(self, *args, **kwargs):
        return _ask(self, "call", args, kwargs)


# Special methods forwarded as they are: Python looks them up on the type, so each needs a method.
FORWARDED = {
    "__len__": "len", "__iter__": "iter", "__next__": "next", "__bool__": "bool", "__hash__": "hash",
    "__str__": "str", "__repr__": "repr", "__format__": "format", "__float__": "float", "__int__": "int",
    "__complex__": "complex", "__index__": "index", "__round__": "round", "__abs__": "abs", "__neg__": "neg",
    "__pos__": "pos", "__invert__": "invert", "__getitem__": "getitem", "__setitem__": "setitem",
    "__delitem__": "delitem", "__contains__": "contains", "__reversed__": "reversed", "__enter__": "enter",
    "__exit__": "exit", "__divmod__": "divmod",
}


def _forwarding(method_name, op):
    def method(self, *args):
        return _ask(self, op, args)
    method.__name__ = method_name
    return method


for _method, _op in FORWARDED.items():
    setattr(Remote, _method, _forwarding(_method, _op))


def _reflected_operation(op):
    def method(self, other):
        return _ask(self, "r" + op, (other,))  # other <op> self, computed where self's type lives
    method.__name__ = "__r{}__".format(op.strip("_"))
    return method


REFLECTED = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "lshift", "rshift",
             "and_", "or_", "xor", "divmod")
for _op in BINARY:
    _method = "__{}__".format(_op.strip("_"))
    setattr(Remote, _method, _forwarding(_method, _op))
for _op in REFLECTED:
    setattr(Remote, "__r{}__".format(_op.strip("_")), _reflected_operation(_op))
    _forward = divmod if _op == "divmod" else getattr(operator, _op)
    OPERATIONS["r" + _op] = (lambda f: lambda obj, other: f(other, obj))(_forward)


# --------------------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------------------

def _remote_description(exc):
    """What the solution said about an exception it raised (kept on the exception the judge re-raised)."""
    return getattr(exc, "_unisd_remote", None)


def judge(job, solution):
    """Run the setup and the tests against the solution; the report's verdict fields."""
    try:
        first = receive(solution.replies)
    except ChannelClosed:
        return {"passed": False, "stage": "load", "error": None, "lost": "the solution process ended without a word"}
    except ProtocolViolation as exc:
        return {"passed": False, "stage": "load", "error": None, "lost": f"protocol violation: {exc}"}
    if isinstance(first, dict) and set(first) == {"err"} and isinstance(first["err"], dict):
        return {"passed": False, "stage": "load", "error": dict(_clean(first["err"]), origin="solution")}
    try:
        namespace = _tests_namespace(job, first, solution)
    except (ProtocolViolation, RecursionError, ValueError, TypeError) as exc:
        return {"passed": False, "stage": "load", "error": None, "lost": f"protocol violation: {exc}"}
    if job.get("tests") is None:
        return {"passed": True, "stage": "end", "error": None, "judged": "self-reported"}
    return _run_tests(job, namespace, solution)


def _tests_namespace(job, first, solution):
    """The namespace the tests run in: the solution's names (from its first reply) as values or handles.
    A reply that is not a list of [name, value] pairs is a ProtocolViolation."""
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    if not (isinstance(first, dict) and set(first) == {"ok"} and type(first["ok"]) is list):
        raise ProtocolViolation("a first reply that is not the solution's names")
    for pair in first["ok"]:
        if type(pair) is not list or len(pair) != 2 or not isinstance(pair[0], str):
            raise ProtocolViolation("a malformed name")
        name = pair[0]
        # The tests' builtins stay the real ones: a solution defining `abs` or `isinstance` must not
        # change what the tests compute (unless that name is the function under test).
        if (name.startswith("__") and name.endswith("__")) or (hasattr(builtins, name) and name != job.get("entry_point")):
            continue
        namespace[name] = solution.decode(pair[1], 0)
    return namespace


def _run_tests(job, namespace, solution):
    """Run the setup and the tests in ``namespace``: a pass only when they ran to their end and the
    solution process never failed on the way."""
    try:
        code = compile(job["setup"] + "\n" + job["tests"], "<tests>", "exec")
        exec(code, namespace)
    except SolutionLost as exc:
        return {"passed": False, "stage": "tests", "error": None, "lost": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - every way the tests can end is a verdict
        _print_traceback(exc)
        remote = _remote_description(exc)
        if remote is not None:
            return {"passed": False, "stage": "tests", "error": dict(remote, origin="solution")}
        return {"passed": False, "stage": "tests", "error": dict(describe_exception(exc), origin="tests")}
    if solution.broken:  # the tests swallowed a SolutionLost (a bare except): still not a pass
        return {"passed": False, "stage": "tests", "error": None, "lost": solution.broken}
    return {"passed": True, "stage": "end", "error": None, "judged": "tests"}


def _clean(err):
    """The solution's own description of its failure: used for the label only, never for a pass."""
    errno = err.get("errno")
    return {"exc": str(err.get("exc"))[:200], "errno": errno if type(errno) is int else None,
            "message": str(err.get("message"))[:1000]}


def _finish_solution(pid, lost):
    """The solution's exit status (negative: the signal that ended it). Killed first unless it is ending."""
    import time

    if lost:  # give a dying process a moment to be reaped with its real cause (e.g. SIGXCPU)
        for _ in range(100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return None if not lost else os.waitstatus_to_exitcode(status)


def _write_program_file(job):
    try:
        with open(PROGRAM_NAME, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(job["solution"] + "\n" + job["setup"])
    except OSError:
        pass  # only for tracebacks and inspect; the solution runs from memory


def main():
    spec = json.loads(sys.argv[1])
    job_path, result_fd = sys.argv[2], int(sys.argv[3])
    parent = os.getppid()
    with open(job_path, encoding="ascii") as fh:
        job = json.load(fh)
    isolation, home = isolate(spec, os.getcwd())
    drop_privileges(spec.get("uid"))
    harden(parent)
    os.chdir(home)  # after a mount over the working directory, the old cwd is the covered one
    os.environ["HOME"] = os.environ["TMPDIR"] = home
    _write_program_file(job)
    set_limits(spec["limits"])
    to_solution_r, to_solution_w = os.pipe()
    from_solution_r, from_solution_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the solution process: nothing of the judge's that it could use survives this block
        os.close(result_fd)
        os.close(to_solution_w)
        os.close(from_solution_r)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        harden(None)
        serve_solution(job, to_solution_r, from_solution_w)
        os._exit(0)
    os.close(to_solution_r)
    os.close(from_solution_w)
    token = sys.stdin.readline().strip()  # only now: the solution process never held it
    solution = Solution(pid, to_solution_w, from_solution_r)
    verdict = judge(job, solution)
    flush_output()
    status = _finish_solution(pid, bool(verdict.get("lost")))
    report = dict(verdict, token=token, isolation=isolation, solution_status=status)
    os.write(result_fd, json.dumps(report).encode("ascii"))
    os._exit(0)


if __name__ == "__main__":
    main()

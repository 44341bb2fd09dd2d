"""Persistent multi-rank worker pool for tests.

A :class:`RankPool` owns ``world_size`` long-lived worker processes that form
one ``torch.distributed`` process group.  Tests ship a *module-level* function
to every rank with :meth:`RankPool.run`; the processes (and the process group)
are reused across tests, so a test pays milliseconds instead of the seconds a
fresh ``torch.multiprocessing.spawn`` costs.

Failure handling:

* an exception on any rank is re-raised in the parent as :class:`RankError`
  (a subclass of both ``AssertionError`` and ``RuntimeError``) whose message
  holds every failing rank's full traceback (asserts in ``tests/test_*.py``
  modules are rewritten in the workers the same way pytest rewrites them);
* a rank that does not finish within ``timeout`` seconds raises
  :class:`RankTimeoutError` with the Python stacks of the unfinished ranks;
* a worker that dies (``os._exit``, segfault, abort) raises
  :class:`RankCrashError` as soon as the death is seen;
* after a timeout or a crash -- or when other ranks stay blocked (e.g. in a
  collective) for ``failure_grace`` seconds after one rank failed -- the
  workers are killed and the pool restarts on the next :meth:`RankPool.run`.

Worker side, :data:`WORKER_CACHE` is a per-process dict that test functions
may use to keep expensive objects (communication buffers, ...) between tests.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import importlib.machinery
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from multiprocessing.connection import wait as _mp_wait
from typing import Any, Callable, Dict, List, Optional

__all__ = [
    "RankPool",
    "RankError",
    "RankTimeoutError",
    "RankCrashError",
    "WORKER_CACHE",
    "prestart_forkserver",
    "close_pools",
    "REPO_ROOT",
]

#: Root of the repository (parent of ``tests/``); put on ``sys.path`` in the
#: workers so test functions can be unpickled by reference.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Per-worker-process cache that test functions may use to keep objects
#: (e.g. communication buffers) alive across ``run`` calls.  Cleared before
#: the process group is destroyed on ``close``; a restarted pool starts with
#: fresh (empty) worker processes.
WORKER_CACHE: Dict[Any, Any] = {}

#: Modules imported once in the forkserver process and thus inherited
#: (copy-on-write) by every worker.  Must not have side effects at import.
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "pytest"]

_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


class RankError(AssertionError, RuntimeError):
    """A :meth:`RankPool.run` call failed on one or more ranks.

    Subclasses both ``AssertionError`` and ``RuntimeError`` so either can be
    used in ``pytest.raises``.  Attributes:

    * ``failures``: ``{rank: formatted traceback}`` of ranks that raised;
    * ``crashed``: ``{rank: exit code}`` of ranks whose process died
      (negative exit code = killed by that signal);
    * ``unfinished``: ranks that had not returned when the call gave up;
    * ``results``: per-rank results, ``None`` where the rank failed.
    """

    def __init__(self, message: str, failures=None, crashed=None, unfinished=None, results=None):
        super().__init__(message)
        self.failures: Dict[int, str] = dict(failures or {})
        self.crashed: Dict[int, int] = dict(crashed or {})
        self.unfinished: List[int] = list(unfinished or [])
        self.results: List[Any] = list(results or [])


class RankTimeoutError(RankError):
    """Some ranks did not finish a :meth:`RankPool.run` call within its timeout."""


class RankCrashError(RankError):
    """A worker process died (non-Python exit, signal, ``os._exit``) during a call."""


# --------------------------------------------------------------------------- #
# Worker side
# --------------------------------------------------------------------------- #


class _AssertRewritingLoader(importlib.machinery.SourceFileLoader):
    """Load a test module with pytest's assertion rewriting (never cached)."""

    def get_code(self, fullname):  # noqa: D401 - importlib API
        path = self.get_filename(fullname)
        source = self.get_data(path)
        try:
            import ast

            from _pytest.assertion.rewrite import rewrite_asserts

            tree = ast.parse(source, filename=path)
            rewrite_asserts(tree, source, path, None)
            return compile(tree, path, "exec", dont_inherit=True)
        except Exception:  # pragma: no cover - fall back to plain asserts
            return compile(source, path, "exec", dont_inherit=True)


class _AssertRewritingFinder:
    """Meta-path finder: rewrite asserts in modules under ``tests/`` like pytest.

    Unlike pytest (test modules and conftest only), helper modules such as
    ``tests/_cases.py`` are rewritten too, since rank functions often live
    there.
    """

    def __init__(self, tests_dir: str):
        self.tests_dir = os.path.normcase(os.path.abspath(tests_dir))

    def find_spec(self, name, path=None, target=None):
        if name == __name__ or not name.startswith("tests."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        origin = os.path.normcase(os.path.abspath(spec.origin))
        if not origin.startswith(self.tests_dir + os.sep):
            return None
        spec.loader = _AssertRewritingLoader(name, spec.origin)
        return spec


class _StubConfig:
    """The bits of a pytest ``Config`` that ``assertrepr_compare`` needs."""

    class _Writer:
        @staticmethod
        def _highlight(source, lexer="python"):
            return source

    def get_verbosity(self, kind=None):
        return 1  # like ``pytest -v``: full diffs (truncated below)

    def get_terminal_writer(self):
        return self._Writer()


def _reprcompare(op, left, right):
    """Detailed comparison explanation (like pytest's) for rewritten asserts."""
    try:
        from _pytest.assertion.util import assertrepr_compare

        lines = assertrepr_compare(_StubConfig(), op, left, right)
    except Exception:
        return None
    if not lines:
        return None
    if len(lines) > 24:
        lines = lines[:24] + [f"...({len(lines) - 24} more lines)"]
    return "\n~".join(line.replace("\n", "\\n") for line in lines).replace("%", "%%")


def _install_assert_rewriting() -> None:
    """Make worker-side asserts in test modules as informative as pytest's."""
    try:
        import _pytest.assertion.rewrite  # noqa: F401
        import _pytest.assertion.util as util
    except Exception:  # pragma: no cover - pytest not importable
        return
    sys.meta_path.insert(0, _AssertRewritingFinder(os.path.join(REPO_ROOT, "tests")))
    util._reprcompare = _reprcompare


def _to_cpu(obj):
    """Move (nested) torch tensors in a result to the CPU before pickling."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if type(obj) in (list, tuple):
        return type(obj)(_to_cpu(x) for x in obj)
    if type(obj) is dict:
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _set_parent_death_signal() -> None:
    """Best effort: get SIGKILLed when our parent (the forkserver) goes away."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # pragma: no cover
        pass


def _worker_main(rank, world_size, backend, store_port, conn, stack_path, pg_timeout_s):
    """Entry point of one worker process (runs until told to close)."""
    _set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import faulthandler

    stack_file = open(stack_path, "w")
    faulthandler.enable(file=stack_file, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True, chain=False)
    _install_assert_rewriting()
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):  # kernels interpreted: its fixes too
        try:
            from tests import _interpret

            _interpret.install()
        except Exception:  # pragma: no cover - no Triton: kernels are not used
            pass

    def send(msg):
        conn.send_bytes(pickle.dumps(msg, protocol=_PICKLE_PROTOCOL))

    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        timeout = datetime.timedelta(seconds=pg_timeout_s)
        store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
        kwargs = {}
        if "nccl" in backend:
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        elif "cuda:" in backend:  # e.g. 'cpu:gloo,cuda:gloo': ranks may share GPUs
            torch.cuda.set_device(rank % torch.cuda.device_count())
            # symmetric memory refuses two ranks on one GPU unless told (this also turns multicast off)
            os.environ.setdefault("TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES", "1")
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    except BaseException:
        send(("init_error", traceback.format_exc()))
        return
    # Everything imported so far lives forever: keep it out of the cyclic GC
    # (a full collection over torch's objects costs ~0.2 s per worker).
    gc.freeze()
    send(("ready", os.getpid()))

    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # parent went away
            break
        if msg[0] == "close":
            break
        _, call_id, payload = msg
        try:
            fn, args, kwargs = pickle.loads(payload)
            result = fn(rank, world_size, *args, **kwargs)
            out = pickle.dumps(("ok", call_id, _to_cpu(result)), protocol=_PICKLE_PROTOCOL)
        except BaseException as exc:  # noqa: BLE001 - report everything
            tb_start = exc.__traceback__.tb_next or exc.__traceback__  # skip this frame
            tb = "".join(traceback.format_exception(type(exc), exc, tb_start))
            out = pickle.dumps(("err", call_id, tb, type(exc).__name__), protocol=_PICKLE_PROTOCOL)
        fn = args = kwargs = result = None  # don't keep the call's objects alive
        try:
            conn.send_bytes(out)
        except (EOFError, OSError):
            break
        out = None

    # Orderly shutdown: drop cached objects before the process group goes away.
    had_cache = bool(WORKER_CACHE)
    WORKER_CACHE.clear()
    try:
        if had_cache:
            gc.collect()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # pragma: no cover
        pass
    try:
        send(("closed",))
    except (EOFError, OSError):
        pass


# --------------------------------------------------------------------------- #
# Parent side
# --------------------------------------------------------------------------- #

_LIVE_POOLS: "weakref.WeakSet[RankPool]" = weakref.WeakSet()
_CTX_LOCK = threading.Lock()
_CONTEXTS: Dict[str, Any] = {}


def _get_context(start_method: str):
    with _CTX_LOCK:
        ctx = _CONTEXTS.get(start_method)
        if ctx is None:
            ctx = mp.get_context(start_method)
            if start_method == "forkserver":
                ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
            _CONTEXTS[start_method] = ctx
        return ctx


def prestart_forkserver() -> None:
    """Start the forkserver (importing :data:`FORKSERVER_PRELOAD`) in the background.

    Optional: lets the server import torch while the parent does other work
    (e.g. pytest collection), so the first :class:`RankPool` starts faster.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return
    _get_context("forkserver")
    from multiprocessing import forkserver

    forkserver.ensure_running()


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _fn_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def close_pools(pools, timeout: float = 10.0) -> None:
    """Close several :class:`RankPool` objects concurrently.

    Workers get ``timeout`` seconds in total to shut down cleanly (clear
    :data:`WORKER_CACHE`, ``destroy_process_group``) before they are killed.
    """
    pools = [p for p in pools if not p._closed]
    for pool in pools:
        pool._send_close()
    deadline = time.monotonic() + timeout
    for pool in pools:
        pool._finish_close(deadline)


@atexit.register
def _close_all_pools() -> None:
    try:
        close_pools(list(_LIVE_POOLS))
    except Exception:  # pragma: no cover
        pass


class RankPool:
    """``world_size`` persistent worker processes sharing one process group.

    Args:
        world_size: number of ranks (worker processes).
        backend: ``'gloo'`` (CPU) or ``'nccl'`` (rank ``r`` uses ``cuda:r``);
            any ``init_process_group`` backend string works, e.g.
            ``'cpu:gloo,cuda:nccl'`` for CPU and GPU collectives in one group.
        start_method: multiprocessing start method; ``'forkserver'`` (default,
            with :data:`FORKSERVER_PRELOAD` preloaded) or ``'spawn'``.
        start_timeout: seconds to wait for all workers to initialise.
        pg_timeout: ``timeout`` passed to ``init_process_group`` (seconds).
        failure_grace: after a rank failed, seconds to wait for the other
            ranks before declaring them stuck and restarting the pool.

    Workers are started in the constructor and restarted lazily (at the next
    :meth:`run`) after a timeout or crash.  Each worker runs with
    ``torch.set_num_threads(1)``, ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set,
    and the repository root on ``sys.path``.  Not thread-safe: one ``run`` at a
    time.
    """

    def __init__(
        self,
        world_size: int,
        backend: str = "gloo",
        *,
        start_method: str = "forkserver",
        start_timeout: float = 120.0,
        pg_timeout: float = 300.0,
        failure_grace: float = 3.0,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"backend must be a torch.distributed backend string, got {backend!r}")
        if start_method == "forkserver" and "forkserver" not in mp.get_all_start_methods():
            start_method = "spawn"
        self.world_size = world_size
        self.backend = backend
        self.start_method = start_method
        self.start_timeout = start_timeout
        self.pg_timeout = pg_timeout
        self.failure_grace = failure_grace
        #: Number of times the workers were (re)started.
        self.generation = 0
        #: Seconds the last (re)start took.
        self.last_start_time: Optional[float] = None
        self._procs: Optional[list] = None
        self._conns: Optional[list] = None
        self._store = None
        self._tmpdir: Optional[str] = None
        self._call_id = 0
        self._closed = False
        _LIVE_POOLS.add(self)
        self._start()

    # ------------------------------------------------------------------ api

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._procs else "stopped")
        return f"RankPool(world_size={self.world_size}, backend={self.backend!r}, {state})"

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> List[int]:
        """PIDs of the current worker processes (empty if not running)."""
        return [p.pid for p in self._procs] if self._procs else []

    def run(self, fn: Callable, *args, timeout: float = 120.0, **kwargs) -> list:
        """Run ``fn(rank, world_size, *args, **kwargs)`` on every rank.

        ``fn``, ``args`` and ``kwargs`` are pickled (``fn`` by reference, so it
        must be a module-level function of an importable module, e.g. a
        ``tests/test_*.py`` module).  Returns the per-rank return values in
        rank order; tensors in (nested lists/tuples/dicts of) results are
        moved to the CPU.  ``timeout`` (seconds, wall clock for the whole
        call) is consumed by ``run`` and never passed to ``fn``.

        If some ranks raise while all others return, the workers are kept
        (the process group is still consistent between calls); they are
        restarted when a rank crashed, timed out, or stayed blocked for
        ``failure_grace`` seconds after another rank failed.

        Raises:
            RankError: some rank raised; message holds all their tracebacks.
            RankCrashError: a worker process died; the pool is restarted.
            RankTimeoutError: ranks did not finish within ``timeout`` seconds;
                the pool is killed and restarted.
        """
        __tracebackhide__ = True  # keep pytest reports focused on the test
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        qualname = getattr(fn, "__qualname__", "")
        if "<locals>" in qualname or "<lambda>" in qualname:
            raise TypeError(
                f"RankPool.run needs a module-level function, got {_fn_name(fn)} "
                "(nested functions and lambdas cannot be pickled by reference)"
            )
        try:
            payload = pickle.dumps((fn, args, kwargs), protocol=_PICKLE_PROTOCOL)
        except Exception as exc:
            raise TypeError(f"cannot pickle call to {_fn_name(fn)} for the workers: {exc}") from exc
        if self._procs is None or not all(p.is_alive() for p in self._procs):
            self._kill()
            self._start()
        self._call_id += 1
        msg = pickle.dumps(("call", self._call_id, payload), protocol=_PICKLE_PROTOCOL)
        try:
            return self._collect(fn, msg, timeout)
        except RankError:
            raise  # _collect already killed the workers if they need a restart
        except BaseException as exc:
            # Interrupted (KeyboardInterrupt, pytest-timeout, ...): report where
            # the unfinished ranks are, then start afresh next time.
            pending = sorted(self._pending)
            if pending and self._procs is not None:
                stacks = self._dump_stacks(pending)
                report = [
                    f"{self!r}: run({_fn_name(fn)}) interrupted by {type(exc).__name__}; "
                    f"rank(s) {pending} had not finished"
                ]
                for r in pending:
                    report.append(f"===== rank {r} stack =====\n{stacks.get(r) or '<no stack captured>'}")
                sys.stderr.write("\n".join(report) + "\n")
                sys.stderr.flush()
            self._kill()
            raise
        finally:
            self._pending = set()

    def restart(self) -> None:
        """Kill the workers and start fresh ones (new process group)."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        self._kill()
        self._start()

    def close(self, timeout: float = 10.0) -> None:
        """Shut the workers down cleanly (``destroy_process_group``); idempotent."""
        close_pools([self], timeout)

    def _send_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _LIVE_POOLS.discard(self)
        close_msg = pickle.dumps(("close",), protocol=_PICKLE_PROTOCOL)
        for conn in self._conns or ():
            try:
                conn.send_bytes(close_msg)
            except OSError:
                pass

    def _finish_close(self, deadline: float) -> None:
        for proc in self._procs or ():
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    # -------------------------------------------------------------- internals

    _needs_restart = False
    _pending: set = frozenset()

    def _start(self) -> None:
        __tracebackhide__ = True  # keep pytest reports focused on the test
        import torch.distributed as dist

        t0 = time.perf_counter()
        ctx = _get_context(self.start_method)
        self._tmpdir = tempfile.mkdtemp(prefix=f"rankpool{self.world_size}_")
        self._store = dist.TCPStore(
            "127.0.0.1",
            0,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.start_timeout),
        )
        port = self._store.port
        procs, conns = [], []
        try:
            for rank in range(self.world_size):
                parent_conn, child_conn = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=_worker_main,
                    name=f"RankPool-rank{rank}",
                    args=(
                        rank,
                        self.world_size,
                        self.backend,
                        port,
                        child_conn,
                        os.path.join(self._tmpdir, f"rank{rank}.stack"),
                        self.pg_timeout,
                    ),
                )
                proc.start()
                child_conn.close()
                procs.append(proc)
                conns.append(parent_conn)
            self._procs, self._conns = procs, conns
            self.generation += 1
            self._needs_restart = False
            self._wait_ready()
        except BaseException:
            self._procs, self._conns = procs, conns
            self._kill()
            raise
        self.last_start_time = time.perf_counter() - t0

    def _wait_ready(self) -> None:
        __tracebackhide__ = True  # keep pytest reports focused on the test
        pending = set(range(self.world_size))
        errors: Dict[int, str] = {}
        crashed: Dict[int, int] = {}
        deadline = time.monotonic() + self.start_timeout

        def on_msg(r, msg):
            if msg[0] == "init_error":
                errors[r] = msg[1]
            return msg[0] in ("ready", "init_error")

        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (errors or crashed):
                break
            self._poll(pending, remaining, on_msg, crashed)
        if not pending and not errors and not crashed:
            return
        parts = [f"{self!r}: failed to start workers ({self.start_method})"]
        for r in sorted(errors):
            parts.append(f"===== rank {r}: init error =====\n{errors[r].rstrip()}")
        for r in sorted(crashed):
            parts.append(f"===== rank {r}: died during init ({_describe_exit(crashed[r])}) =====" + self._stack_text(r))
        if pending - set(errors) - set(crashed):
            parts.append(f"ranks still initialising after the failure/timeout: {sorted(pending)}")
        raise RankCrashError("\n".join(parts), failures=errors, crashed=crashed, unfinished=sorted(pending))

    def _poll(self, pending: set, timeout: float, on_msg, crashed: Dict[int, int]) -> None:
        """Wait up to ``timeout`` for messages/deaths of ``pending`` ranks."""
        conn_rank = {self._conns[r]: r for r in pending}
        sent_rank = {self._procs[r].sentinel: r for r in pending}
        ready = _mp_wait(list(conn_rank) + list(sent_rank), timeout)
        dead = set()
        for obj in ready:
            if obj in conn_rank:
                r = conn_rank[obj]
                try:
                    msg = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):
                    dead.add(r)
                    continue
                if on_msg(r, msg) is not False:
                    pending.discard(r)
            elif obj in sent_rank:
                r = sent_rank[obj]
                if r in pending and not self._conns[r].poll():
                    dead.add(r)
        for r in dead:
            if r in pending:
                pending.discard(r)
                proc = self._procs[r]
                proc.join(1.0)
                crashed[r] = proc.exitcode
                self._needs_restart = True

    def _collect(self, fn, msg: bytes, timeout: float) -> list:
        __tracebackhide__ = True  # keep pytest reports focused on the test
        ws = self.world_size
        call_id = self._call_id
        results: List[Any] = [None] * ws
        failures: Dict[int, str] = {}
        crashed: Dict[int, int] = {}
        pending = self._pending = set(range(ws))
        for r in range(ws):
            try:
                self._conns[r].send_bytes(msg)
            except OSError:
                pass  # dead worker: its sentinel reports it below

        def on_msg(r, m):
            if m[0] == "ok" and m[1] == call_id:
                results[r] = m[2]
            elif m[0] == "err" and m[1] == call_id:
                failures[r] = m[2]
            else:
                return False  # stale / unexpected message: keep waiting
            return True

        t0 = time.monotonic()
        deadline = t0 + timeout
        grace_started = False
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._poll(pending, remaining, on_msg, crashed)
            if (failures or crashed) and pending and not grace_started:
                grace_started = True
                deadline = min(deadline, time.monotonic() + self.failure_grace)

        if not pending and not failures and not crashed:
            return results

        name = _fn_name(fn)
        unfinished = sorted(pending)
        stacks = {}
        if unfinished:
            self._needs_restart = True
            stacks = self._dump_stacks(unfinished)
        parts = []
        if failures or crashed:
            bad = sorted(set(failures) | set(crashed))
            parts.append(f"{self!r}: {name} failed on rank(s) {bad}")
        else:
            parts.append(
                f"{self!r}: {name} timed out after {timeout:g}s; "
                f"rank(s) {unfinished} did not finish "
                f"(finished: {sorted(set(range(ws)) - set(unfinished))})"
            )
        for r in sorted(failures):
            parts.append(f"===== rank {r} traceback =====\n{failures[r].rstrip()}")
        for r in sorted(crashed):
            parts.append(
                f"===== rank {r} worker process died ({_describe_exit(crashed[r])}) =====" + self._stack_text(r)
            )
        if unfinished and (failures or crashed):
            parts.append(
                f"rank(s) {unfinished} were still running {self.failure_grace:g}s after the "
                "failure (probably blocked in a collective)"
            )
        for r in unfinished:
            parts.append(
                f"===== rank {r} stack (did not finish) =====\n{stacks.get(r, '').rstrip() or '<no stack captured>'}"
            )
        if self._needs_restart:
            parts.append("(worker processes killed; the pool restarts on the next run)")
            self._kill()
        message = "\n".join(parts)
        cls = RankCrashError if crashed else (RankTimeoutError if not failures else RankError)
        raise cls(message, failures=failures, crashed=crashed, unfinished=unfinished, results=results)

    def _stack_text(self, rank: int) -> str:
        if not self._tmpdir:
            return ""
        try:
            with open(os.path.join(self._tmpdir, f"rank{rank}.stack")) as f:
                text = f.read().strip()
        except OSError:
            return ""
        return ("\n" + text) if text else ""

    def _dump_stacks(self, ranks) -> Dict[int, str]:
        """Ask ``ranks`` (via faulthandler on SIGUSR1) for their Python stacks."""
        for r in ranks:
            try:
                os.kill(self._procs[r].pid, signal.SIGUSR1)
            except OSError:
                pass
        out: Dict[int, str] = {}
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for r in ranks:
                if r not in out:
                    text = self._stack_text(r)
                    if text:
                        out[r] = text
            if len(out) == len(ranks):
                time.sleep(0.05)  # let the dumps finish writing
                return {r: self._stack_text(r).strip() for r in ranks}
            time.sleep(0.02)
        return {r: self._stack_text(r).strip() for r in ranks}

    def _kill(self) -> None:
        procs, conns = self._procs, self._conns
        self._procs = self._conns = None
        for proc in procs or ():
            if proc.exitcode is None:
                try:
                    proc.kill()
                except Exception:  # pragma: no cover
                    pass
        for proc in procs or ():
            proc.join(5.0)
            try:
                proc.close()
            except Exception:  # pragma: no cover
                pass
        for conn in conns or ():
            try:
                conn.close()
            except OSError:  # pragma: no cover
                pass
        self._store = None
        self._needs_restart = False
        self._cleanup_files()

    def _cleanup_files(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

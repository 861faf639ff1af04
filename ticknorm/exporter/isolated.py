"""Run the dynamo exporter in a forked child process, so that whatever it keeps alive leaves with it.

The dynamo exporter keeps the model's weights referenced after it returns (from C++ and from fx
graphs no public call releases). Measured on the 1.1B Llama of `benchmarks/large_model.py`, the
weights then stayed resident beside ONNX Runtime's verification session: peak RSS x1.8 the bare
export's. A forked child shares the parent's weights copy-on-write (nothing is copied or pickled),
writes the exported file, and exits; the parent never held the exporter's leftovers, so a model it
loaded itself is really freed before a session maps the exported weights.

Where `os.fork` does not exist (Windows) the work runs in this process, as before.
"""

import gc
import os
import signal
import sys
import warnings

from ticknorm.base.errors import ExportError


def run_isolated(work) -> None:
    """Call `work()` in a forked child and wait for it. An exception there comes back as an
    ExportError with its message; a child killed by a signal (the kernel's out-of-memory killer,
    a crash in C++) says so. An interrupt here kills the child before it propagates."""
    if not hasattr(os, "fork"):
        work()
        return
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns when a threaded process forks: the child below takes none of the locks
        # another thread may hold (its stdio is replaced, torch runs single-threaded, logging's
        # locks are reinitialized by Python) and leaves with os._exit
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        _child(work, read_end, write_end)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
    except BaseException:
        _kill(pid)
        raise
    if os.WIFSIGNALED(status):
        raise ExportError(f"the exporter's process was killed by {_signal_name(os.WTERMSIG(status))}"
                          + (" (out of memory?)" if os.WTERMSIG(status) == signal.SIGKILL else ""))
    if os.WEXITSTATUS(status):
        raise ExportError(message or f"the exporter's process exited with status {os.WEXITSTATUS(status)}")


def _child(work, read_end: int, write_end: int) -> None:
    """The child's whole life: never returns, and never frees what it copied from its parent. A
    destructor of such an object (an ONNX Runtime session waiting on its thread pool's condition
    variable, whose threads were not copied) can block forever: the garbage it inherited is frozen
    out of collection, the exception it fails with (whose chain may reach the parent's frames) stays
    referenced, and it leaves by os._exit, without the parent's cleanup (atexit handlers,
    temporary folders' finalizers)."""
    gc.freeze()
    os.close(read_end)
    status, message, failure = 0, b"", None
    try:
        _detach_from_parent()
        work()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as one message
        failure = sys.exc_info()[1]  # kept until os._exit: never freed here
        status = 1
        text = (str(failure) if isinstance(failure, ExportError)
                else f"the exporter failed: {type(failure).__name__}: {failure}")
        message = text.encode()
    finally:
        try:
            os.write(write_end, message)
        finally:
            os._exit(status)


def _detach_from_parent() -> None:
    """What a forked child must not share with its parent's other threads: torch's OpenMP pool (a
    parallel region in the child of a process that ran one hangs in libgomp) and Python's stdio
    objects (a lock another thread held at the fork stays held here)."""
    import torch

    torch.set_num_threads(1)
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the child


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"

"""Worker processes that never outlive the run that started them.

A pool's workers wait on a pipe for jobs; when the parent is killed (kill -9, or SIGTERM without a
handler, which is what ``timeout``, Slurm and ``docker stop`` send) nothing closes that pipe and they
wait for ever, holding their memory. Each worker here watches its parent and exits when it is gone, and
the pool is terminated on every exit path of the ``with`` block, including the ``SystemExit`` that
:func:`exit_on_sigterm` turns SIGTERM into.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator

#: How often a worker checks that its parent is still alive, in seconds.
PARENT_POLL_S = 0.5


def _watch_parent(parent_pid: int) -> None:
    """Pool initializer: default SIGTERM handling, and exit as soon as the parent process is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which terminates the pool

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


@contextlib.contextmanager
def worker_pool(processes: int) -> Iterator[multiprocessing.pool.Pool]:
    """A ``multiprocessing`` pool whose workers die with the parent and are terminated when the block exits.

    Uses fork where available (spawn would re-import the caller's ``__main__``, which breaks scripts
    without a main guard); the jobs must not use torch, whose thread pools do not survive a fork.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*use of fork\\(\\) may lead to deadlocks.*")
        pool = context.Pool(processes, initializer=_watch_parent, initargs=(os.getpid(),))
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()


#: The exit status a SIGTERM ends the run with (the shell's 128 + signal number).
SIGTERM_EXIT = 128 + signal.SIGTERM
#: Seconds after which a SIGTERM whose exit was dropped is sent again.
REDELIVER_AFTER_S = 0.05


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


#: The hook :func:`_deliver_swallowed_sigterm_again` passes every other unraisable exception to.
_previous_unraisablehook = sys.unraisablehook


def _deliver_swallowed_sigterm_again(unraisable: sys.UnraisableHookArgs) -> None:
    """``sys.unraisablehook``: a SIGTERM whose ``SystemExit`` was raised inside code whose exceptions Python only
    prints (a fork hook, such as filelock's after each pool worker starts; a finaliser) is sent again, a moment
    later from another thread, so that it lands in ordinary code and ends the run after all (sent at once, it
    would land in this hook, which drops exceptions too); anything else is reported as before."""
    if isinstance(unraisable.exc_value, SystemExit) and unraisable.exc_value.code == SIGTERM_EXIT:
        again = threading.Timer(REDELIVER_AFTER_S, os.kill, args=(os.getpid(), signal.SIGTERM))
        again.daemon = True
        again.start()
        return
    _previous_unraisablehook(unraisable)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread, so ``with`` blocks and ``finally`` clauses
    run (temporary files removed, worker pools terminated) before the process exits. Main thread only.

    Python runs the handler wherever the main thread is; where that is a fork hook or a finaliser, the
    ``SystemExit`` is printed and dropped and the run would go on to its end (measured: SIGTERM during the data
    generation's pool start, exit status 0 after the whole build), so such a SIGTERM is delivered again."""
    global _previous_unraisablehook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_system_exit)
        if sys.unraisablehook is not _deliver_swallowed_sigterm_again:
            _previous_unraisablehook = sys.unraisablehook
            sys.unraisablehook = _deliver_swallowed_sigterm_again

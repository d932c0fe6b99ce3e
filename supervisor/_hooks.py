"""The user's hooks of a run, called where they can never hold up enforcement.

``on_warning``, ``on_violation`` and ``on_usage`` run in order on one thread of their own,
started at the first call: a hook that sleeps (a webhook, a slow logger) never delays a
kill, a deadline or an RPC reply. ``drain()`` waits for the queue to empty, so every hook
has run by the time ``on_end`` is called and the run returns. A hook that raises is
reported to ``on_error`` (the run logs it on stderr and in the audit log) and the run goes
on.
"""

from __future__ import annotations

# Imported on every run (a run may have hooks): queue, threading and typing only when a
# hook is actually called, or for the type checker.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import queue
    import threading
    from collections.abc import Callable
    from typing import Any

__all__ = ["HookRunner", "call_quietly"]

_STOP = object()


def call_quietly(hook: Callable[..., object] | None, *args: object) -> None:
    """Run a hook on this thread; one that raises is reported on stderr, never raised
    (``Run.on_sample``, for ``--live``: it must never break enforcement)."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception as e:
        import sys

        print(f"supervise: a hook raised {type(e).__name__}: {e}", file=sys.stderr)


class HookRunner:
    """Calls hooks in order on a thread of its own; reports those that raise."""

    def __init__(self, on_error: Callable[[str, BaseException], object]) -> None:
        self._on_error = on_error
        self._queue: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None

    def call(self, name: str, hook: Callable[[Any], object] | None, arg: Any) -> None:
        """Queue ``hook(arg)``; nothing happens when ``hook`` is None."""
        if hook is None:
            return
        if self._queue is None:
            import queue
            import threading

            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(
                target=self._work, args=(self._queue,), name="supervise-hooks", daemon=True
            )
            self._thread.start()
        self._queue.put((name, hook, arg))

    def call_now(self, name: str, hook: Callable[[Any], object] | None, arg: Any) -> None:
        """Call ``hook(arg)`` on this thread (``on_end``: the run is over, nothing to delay)."""
        if hook is None:
            return
        try:
            hook(arg)
        except Exception as error:
            try:
                self._on_error(name, error)
            except Exception:  # e.g. the audit log failed too: the run reports that itself
                pass

    def _work(self, todo: queue.SimpleQueue[Any]) -> None:
        while True:
            item = todo.get()
            if item is _STOP:
                return
            name, hook, arg = item
            try:
                hook(arg)
            except Exception as error:
                try:
                    self._on_error(name, error)
                except Exception:  # reporting must not end the thread: later hooks still run
                    pass

    def drain(self) -> None:
        """Wait until every queued hook has run, then end the thread."""
        thread, todo = self._thread, self._queue
        if thread is None or todo is None:
            return
        todo.put(_STOP)
        thread.join()
        self._thread = self._queue = None

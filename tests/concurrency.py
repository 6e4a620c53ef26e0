"""Calls released together from several threads (tests of callers in a server's worker pool)."""

from __future__ import annotations

import threading


def call_together(fn, args: list) -> list:
    """fn(arg) for each arg, each in a thread of its own, released together: the results, or the exceptions."""
    results: list = [None] * len(args)
    start = threading.Barrier(len(args))

    def work(i):
        start.wait()
        try:
            results[i] = fn(args[i])
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results

"""Progress on stderr for the slow steps of the command-line tools (off with ``--quiet``).

:func:`step` reports one long step without its own progress bar (loading the model): a start line, a
ticking elapsed time when stderr is a terminal, and the time taken. :func:`bar` is a tqdm bar on stderr,
or a no-op object when progress is off.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, Optional, TextIO


@contextlib.contextmanager
def step(desc: str, enabled: bool = True, stream: Optional[TextIO] = None, tick_s: float = 1.0) -> Iterator[None]:
    """``desc ...`` now, the elapsed seconds every ``tick_s`` on a terminal, ``desc: N.N s`` at the end."""
    if not enabled:
        yield
        return
    stream = stream if stream is not None else sys.stderr
    t0 = time.perf_counter()
    live = hasattr(stream, "isatty") and stream.isatty()
    stop = threading.Event()
    stream.write(f"{desc} ..." + ("" if live else "\n"))
    stream.flush()
    ticker = None
    if live:
        def tick():
            while not stop.wait(tick_s):
                stream.write(f"\r{desc} ... {time.perf_counter() - t0:.0f} s")
                stream.flush()
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    try:
        yield
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        done = f"{desc}: {time.perf_counter() - t0:.1f} s"
        stream.write(f"\r{done}\033[K\n" if live else done + "\n")  # \033[K clears the ticking text
        stream.flush()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def bar(enabled: bool, **tqdm_kwargs):
    """A tqdm progress bar on stderr (``tqdm_kwargs`` as tqdm's), or one that prints nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(file=sys.stderr, **tqdm_kwargs)

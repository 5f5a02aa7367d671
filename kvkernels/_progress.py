"""Progress on stderr for the slow steps of the command-line tools (off with ``--quiet``).

:func:`step` brackets one long step with a start line and a line with the time it took (the step may
print its own progress bar in between, as transformers does while it loads a GGUF model); with progress
off it swallows whatever the step writes to stderr. :func:`bar` is a tqdm bar on stderr, or a no-op
object when progress is off.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from typing import Iterator


@contextlib.contextmanager
def step(desc: str, enabled: bool = True) -> Iterator[None]:
    """``desc ...`` on stderr now and ``desc: N.N s`` when the block ends; silent when not ``enabled``."""
    if not enabled:
        with contextlib.redirect_stderr(io.StringIO()):  # e.g. third-party progress bars
            yield
        return
    t0 = time.perf_counter()
    print(f"{desc} ...", file=sys.stderr, flush=True)
    yield
    print(f"{desc}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


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

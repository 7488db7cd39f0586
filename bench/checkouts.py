"""Another commit's code under the same load, measured alternately with this checkout's.

A change to the instrumentation moves the CPU share under the demo's load by less than one
run's spread (a point or so: the machine's other work, the cache state each run starts in),
so a change is judged by runs of both sides taken in turn in one session. The services (and
the simulators) the benchmark starts then import the other commit's ``src/`` first
(``PYTHONPATH``); the benchmark itself, the load it drives and the local stack stay this
checkout's, so both sides get the same load.

Example::

    with checkout_of("76f70d1") as source:
        for pair, theirs in alternating(3):
            with services_from(source if theirs else None):
                measure()
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CheckoutError", "alternating", "checkout_of", "commit_of", "services_from"]

#: The checkout this file is in.
ROOT = Path(__file__).resolve().parents[1]


class CheckoutError(RuntimeError):
    """``ref`` names no commit of this checkout, or git cannot make a worktree of it."""


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CheckoutError(f"git {args[0]} failed: {error}") from error
    if done.returncode != 0:
        raise CheckoutError(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def commit_of(ref: str) -> str:
    """The commit ``ref`` names (a hash, a branch, ``HEAD~2``...); :class:`CheckoutError` if none."""
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except CheckoutError:
        raise CheckoutError(f"--against {ref!r}: no such commit in {ROOT}") from None


@contextlib.contextmanager
def checkout_of(ref: str) -> Iterator[Path]:
    """The ``src/`` of commit ``ref``, checked out in a temporary worktree (detached) for as long
    as the block runs; raises :class:`CheckoutError` if ``ref`` names no commit."""
    commit = commit_of(ref)
    with tempfile.TemporaryDirectory(prefix="bench-against-") as parent:
        tree = Path(parent) / commit[:12]
        _git("worktree", "add", "--detach", "--quiet", str(tree), commit)
        try:
            yield tree / "src"
        finally:
            with contextlib.suppress(CheckoutError):
                _git("worktree", "remove", "--force", str(tree))


@contextlib.contextmanager
def services_from(source: Path | None) -> Iterator[None]:
    """Processes started in the block import ``source`` ahead of anything else; None: this
    checkout's code, as installed."""
    if source is None:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), before]))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def alternating(pairs: int) -> list[tuple[int, bool]]:
    """The order of the runs: ``(pair, theirs)``, this checkout first in even pairs and the
    other first in odd ones, so neither side always runs on the warmer machine.

    >>> alternating(2)
    [(0, False), (0, True), (1, True), (1, False)]
    """
    return [(pair, theirs) for pair in range(pairs) for theirs in ((False, True) if pair % 2 == 0 else (True, False))]

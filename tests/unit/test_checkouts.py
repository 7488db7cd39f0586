"""`bench/pipeline_cpu.py --demo --against REF`: another commit's code checked out beside this
one, the services started from it, the runs taken in turn, and the comparison printed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, clean_env

sys.path.insert(0, str(ROOT / "bench"))

from checkouts import CheckoutError, alternating, checkout_of, services_from
from pipeline_cpu import paired_lines
from profile_share import Share

#: What a child process imports chatobs from.
WHERE = "import chatobs, pathlib; print(pathlib.Path(chatobs.__file__).resolve().parents[1])"


def _imported_from() -> str:
    """Where a child process started now (inheriting this environment) imports chatobs from."""
    done = subprocess.run([sys.executable, "-c", WHERE], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


def _a_git_checkout() -> bool:
    try:
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, timeout=30)
    except OSError:
        return False
    return found.returncode == 0


@pytest.mark.skipif(not _a_git_checkout(), reason="--against needs a git checkout, and this is none")
def test_a_commit_is_checked_out_for_the_block_and_its_services_import_it():
    before = os.environ.get("PYTHONPATH")
    with checkout_of("HEAD") as source:
        assert (source / "chatobs" / "__init__.py").is_file()
        assert source.resolve() != (ROOT / "src").resolve()
        with services_from(source):
            assert _imported_from() == str(source.resolve()), "a process started in the block imports the commit"
        assert os.environ.get("PYTHONPATH") == before, "PYTHONPATH is put back as it was"
        with services_from(None):
            assert _imported_from() != str(source.resolve())
    assert not source.exists(), "the worktree is removed after the block"
    listed = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True, check=True)
    assert str(source.parent) not in listed.stdout


def test_a_name_that_is_no_commit_is_refused_naming_the_option():
    with pytest.raises(CheckoutError, match="--against 'no-such-commit'"), checkout_of("no-such-commit"):
        pass


def test_the_benchmark_refuses_a_bad_ref_before_any_run():
    refused = subprocess.run([sys.executable, "bench/pipeline_cpu.py", "--demo", "--against", "no-such-commit"],
                             cwd=ROOT, env=clean_env({}), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "--against 'no-such-commit': no such commit" in refused.stderr


def test_the_sides_take_turns_going_first():
    assert alternating(3) == [(0, False), (0, True), (1, True), (1, False), (2, False), (2, True)]


def _shares(gateway: tuple[int, int], worker: tuple[int, int] | None = None) -> dict[str, Share]:
    shares = {"gateway": Share(samples=gateway[0], instrumentation=gateway[1])}
    if worker is not None:
        shares["worker"] = Share(samples=worker[0], instrumentation=worker[1])
    return shares


def test_the_comparison_shows_each_sides_median_and_each_pairs_difference():
    runs = [
        (0, False, _shares((1000, 60), (1000, 40))),  # whole 5.0%
        (0, True, _shares((1000, 80), (1000, 60))),  # whole 7.0%
        (1, True, _shares((1000, 70), (1000, 50))),  # whole 6.0%
        (1, False, _shares((1000, 70), (1000, 50))),  # whole 6.0%
        (2, False, _shares((1000, 50), None)),  # a run whose worker was not profiled
        (2, True, _shares((1000, 90), None)),
    ]
    header, whole, gateway, worker = paired_lines("76f70d1", runs)
    assert "this checkout" in header and "76f70d1" in header
    assert whole.split() == ["whole", "pipeline", "5.0%", "7.0%", "-2.0,", "+0.0,", "-4.0"]
    assert gateway.split() == ["gateway", "6.0%", "8.0%", "-2.0,", "+0.0,", "-4.0"]
    assert worker.split() == ["worker", "4.5%", "5.5%", "-2.0,", "+0.0"]

"""What the HTTP benchmark (bench/throughput.py) makes of its rounds: a variant's ratio is the
median of its per-round ratios, printed with their range, and wrk's figure is read or refused."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from throughput import HttpResult, _requests_per_second

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:8000/v1/ping/item-42
  1 threads and 16 connections
  19843 requests in 5.00s, 2.71MB read
Requests/sec:   3968.41
Transfer/sec:    555.04KB
"""


def test_a_variant_is_the_median_of_its_rounds_with_their_range():
    result = HttpResult.of(
        {"off": [1000.0, 1200.0, 900.0], "full": [930.0, 1100.0, 700.0]},
        {"full": [0.93, 0.92, 0.78]},
    )
    assert result.rps == {"off": 1000.0, "full": 930.0}
    assert result.ratios == {"full": 0.92}
    assert result.spread == {"full": (0.78, 0.93)}


def test_wrk_requests_per_second_is_read_from_its_summary():
    assert _requests_per_second(WRK_OUTPUT) == 3968.41


def test_wrk_output_without_a_rate_is_an_error_that_shows_it():
    with pytest.raises(RuntimeError, match="no Requests/sec in wrk's output: unable to connect"):
        _requests_per_second("unable to connect to 127.0.0.1:8000 Connection refused\n")

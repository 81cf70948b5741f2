"""The histogram bucket a request's duration or size counts in (``metrics.bucket``)."""

from __future__ import annotations

from bisect import bisect_left

from nodeagent.telemetry.metrics import BUCKETS, bucket


def test_bucket_is_the_first_bound_not_below_the_value() -> None:
    values = [0, 0.25, 0.5, 0.75, 1, 3, 31, 1000, 1000.5, 3_600_000, 3_600_001, 10**12]
    values += [b for b in BUCKETS] + [b + 0.001 for b in BUCKETS] + [b - 0.001 for b in BUCKETS]
    for v in values:
        assert bucket(v) == bisect_left(BUCKETS, v), v


def test_a_value_on_a_bound_counts_in_it_and_past_the_last_in_inf() -> None:
    assert BUCKETS[bucket(1)] == 1  # le="1.0" holds a 1 ms request
    assert BUCKETS[bucket(0)] == 0.5
    assert bucket(BUCKETS[-1] + 1) == len(BUCKETS)  # +Inf

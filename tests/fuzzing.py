"""The suite's Hypothesis profiles and the ``fuzz`` marker: one place that says how hard
the fuzz tests try.

Profiles, chosen with ``HYPOTHESIS_PROFILE`` (``ci`` when unset):

- ``ci``: bounded, what every run of the suite does: ``CI_EXAMPLES`` examples per test
  (times the test's weight), so the whole fuzz set adds well under a minute on a 2-CPU
  box; no deadline (a loaded box must not fail a test for being slow; a test that needs
  bounded time asserts it itself); random examples each run (``derandomize`` off: each
  run explores new ground) with ``print_blob`` on, so a failure prints the line that
  replays it (``@reproduce_failure``), and the example database keeps it for the next
  run on this machine.
- ``long``: ``LONG_FACTOR`` times as many examples, for ``scripts/fuzz.sh``.

A fuzz test is written ``@fuzz()`` (or ``@fuzz(weight)`` for a cheap or costly one)
above ``@given``: it gets the marker ``fuzz`` (``pytest -m fuzz`` runs them alone) and
``weight`` times the profile's examples. Property tests that are not fuzzing keep their
own ``@settings``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final, TypeVar

import pytest
from hypothesis import HealthCheck, settings

CI_EXAMPLES: Final = 200
LONG_FACTOR: Final = 20
PROFILES: Final = ("ci", "long")

_common = settings(
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", _common, max_examples=CI_EXAMPLES)
settings.register_profile("long", _common, max_examples=CI_EXAMPLES * LONG_FACTOR)

PROFILE: Final = os.environ.get("HYPOTHESIS_PROFILE") or "ci"
if PROFILE not in PROFILES:
    raise pytest.UsageError(f"HYPOTHESIS_PROFILE={PROFILE!r}: the profiles are {PROFILES}")
settings.load_profile(PROFILE)

T = TypeVar("T", bound=Callable[..., object])


def fuzz(weight: float = 1.0) -> Callable[[T], T]:
    """Mark a ``@given`` test as fuzzing, with ``weight`` times the profile's examples."""

    def mark(test: T) -> T:
        examples = max(1, round(settings.get_profile(PROFILE).max_examples * weight))
        marked: T = pytest.mark.fuzz(settings(max_examples=examples)(test))
        return marked

    return mark

"""`Admission`: the queue-wait estimate and the decision to shed, in plain Python (no Serve, no model, no clock)."""

from __future__ import annotations

import pytest

from deployments.admission import Admission
from deployments.errors import Overloaded


def admission(max_queue_wait_s: float | None = 0.2) -> Admission:
    """Full batches of 4 texts or 1000 tokens."""
    return Admission(max_queue_wait_s, max_texts=4, max_tokens=1000)


def test_a_request_is_its_larger_share_of_a_full_batch() -> None:
    shares = admission()
    assert shares.fullness(1, 100) == 0.25
    assert shares.fullness(1, 500) == 0.5
    assert shares.fullness(8, 10) == 2.0


def test_until_a_well_filled_batch_ran_the_wait_is_unknown_and_nothing_is_shed() -> None:
    shedding = admission()
    # Small batches are mostly fixed cost per pass: they do not teach the pace.
    shedding.record_batch(texts=1, tokens=10, seconds=1.0)
    shedding.record_batch(texts=1, tokens=499, seconds=1.0)
    assert shedding.batches_per_s is None
    with shedding.admitted(100.0):
        assert shedding.queue_wait_s == 0
        shedding.check()


def test_the_wait_is_pending_work_at_the_pace_of_full_batches() -> None:
    shedding = admission()
    shedding.record_batch(texts=4, tokens=100, seconds=0.1)  # 10 full batches per second
    assert shedding.batches_per_s == pytest.approx(10.0)
    with shedding.admitted(shedding.fullness(8, 100)):
        assert shedding.queue_wait_s == pytest.approx(0.2)
    assert shedding.queue_wait_s == 0


def test_the_pace_follows_new_batches_as_a_moving_average() -> None:
    shedding = admission()
    shedding.record_batch(texts=4, tokens=0, seconds=0.1)
    shedding.record_batch(texts=2, tokens=0, seconds=0.1)  # half full: counts, at 5 per second
    assert shedding.batches_per_s == pytest.approx(0.7 * 10 + 0.3 * 5)
    shedding.record_batch(texts=4, tokens=0, seconds=0.0)  # no time measured: teaches nothing
    assert shedding.batches_per_s == pytest.approx(8.5)


def test_more_queued_work_than_the_limit_sheds_with_the_seconds_to_wait() -> None:
    shedding = admission(max_queue_wait_s=0.2)
    shedding.record_batch(texts=4, tokens=0, seconds=1.0)  # one full batch per second
    with shedding.admitted(0.2):
        shedding.check()  # 0.2 s queued: at the limit, still admitted
        with shedding.admitted(2.5), pytest.raises(Overloaded) as refused:
            shedding.check()  # 2.7 s queued
    assert refused.value.retry_after_s == 3  # 2.7 - 0.2 = 2.5 s, rounded up
    assert str(refused.value) == (
        "the replica is busy: about 2.7 s of work is queued ahead (max_queue_wait_s 0.2); "
        "retry after Retry-After seconds"
    )
    assert shedding.pending_batches == pytest.approx(0, abs=1e-12)  # float sums leave a trace at most


def test_retry_after_is_at_least_a_second() -> None:
    shedding = admission(max_queue_wait_s=0.2)
    shedding.record_batch(texts=4, tokens=0, seconds=1.0)
    with shedding.admitted(0.25), pytest.raises(Overloaded) as refused:
        shedding.check()
    assert refused.value.retry_after_s == 1


def test_a_refused_request_is_not_counted_and_an_admitted_one_is_released_however_it_ends() -> None:
    shedding = admission(max_queue_wait_s=0.2)
    shedding.record_batch(texts=4, tokens=0, seconds=1.0)
    with shedding.admitted(0.5):
        with pytest.raises(Overloaded), shedding.admitted(0.25):
            pass
        assert shedding.pending_batches == 0.5
    with pytest.raises(RuntimeError), shedding.admitted(0.1):
        raise RuntimeError("the model failed")
    assert shedding.pending_batches == 0


def test_without_a_limit_nothing_is_shed() -> None:
    unbounded = admission(max_queue_wait_s=None)
    unbounded.record_batch(texts=4, tokens=0, seconds=1.0)
    with unbounded.admitted(1000.0):
        assert unbounded.queue_wait_s == 1000
        unbounded.check()

"""The one wire time format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from omx.timefmt import iso_time


def test_seconds_datetimes_and_now_share_one_format() -> None:
    assert iso_time(1.5) == "1970-01-01T00:00:01.500000Z"
    assert iso_time(datetime(2318, 1, 1, tzinfo=UTC)) == "2318-01-01T00:00:00.000000Z"
    local = datetime(2024, 5, 1, 12, 0, 0, 7, tzinfo=timezone(timedelta(hours=2)))
    assert iso_time(local) == "2024-05-01T10:00:00.000007Z"
    assert iso_time(local.timestamp()) == iso_time(local)
    before = datetime.now(UTC)
    now = datetime.fromisoformat(iso_time())
    assert before <= now <= datetime.now(UTC)


def test_the_cached_second_never_leaks_into_another_second() -> None:
    for ts in (100.999999, 101.0, 100.5, 1e9 + 0.25):
        assert iso_time(ts) == datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")[:-6] + "Z"

"""Enumeration alerts (proxy/enumeration.py), pure: an injected clock, no database.

Strategy: replay workloads as Observations with a fake clock. An honest support
agent (the same 60 customers every day, 20 new random ones a day, a list of
recent tickets now and then) raises nothing with the default rules; an insider
walking ids with keyset pages, paging with OFFSET, or looking up 150 random
customers in an hour raises the matching alert inside the window. Then the
rules one by one: window expiry, silence for a window after an alert, users and
tables kept apart, the lock flag, the memory bound; and a hypothesis property
that the id_run and lookups measures equal a brute-force count over the window.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.enumeration import (
    DEFAULT_RULES,
    Alert,
    AlertRules,
    Observation,
    Watcher,
    integer_key,
)

CUSTOMERS = "public.customers"
TICKETS = "public.tickets"
HOUR = 3600.0
DAY = 24 * HOUR
IDS = range(1, 68_001)
Measures = dict[str, int]


def obs(
    keys: Iterable[int | str],
    at: float,
    *,
    user: str = "mallory",
    table: str = CUSTOMERS,
    lookup: bool = False,
    paging: bool = False,
) -> Observation:
    return Observation(
        user=user,
        role="support",
        table=table,
        keys=tuple(str(k) for k in keys),
        lookup=lookup,
        paging=paging,
        at=at,
    )


def measures(
    watcher: Watcher, now: float, table: str = CUSTOMERS, user: str = "mallory"
) -> Measures:
    """One table's measures from state(); {} when the user holds nothing of it."""
    return cast(Measures, watcher.state(user, now).get(table, {}))


def kinds(alerts: Iterable[Alert]) -> list[str]:
    return [a.kind for a in alerts]


def keyset_walk(
    watcher: Watcher,
    *,
    start: int,
    pages: int,
    every_s: float,
    at: float = 0.0,
    rules: AlertRules = DEFAULT_RULES,
) -> list[tuple[float, Alert]]:
    """WHERE id > last ORDER BY id LIMIT 50, one page every `every_s` seconds."""
    raised: list[tuple[float, Alert]] = []
    for page in range(pages):
        first = start + 50 * page
        now = at + page * every_s
        raised += [(now, a) for a in watcher.observe(obs(range(first, first + 50), now), rules)]
    return raised


def longest_run(numbers: set[int]) -> int:
    best = 0
    for n in numbers:
        if n - 1 not in numbers:
            end = n
            while end + 1 in numbers:
                end += 1
            best = max(best, end - n + 1)
    return best


# Workloads


def honest_day(watcher: Watcher, day: int, rng: random.Random, rules: AlertRules) -> list[Alert]:
    """Eight hours: the regulars, 20 new callers, and the recent-ticket list four times."""
    regulars = [(i * 1_117) % 68_000 + 1 for i in range(60)]  # scattered, fixed every day
    start = day * DAY + 9 * HOUR
    calls = [*regulars, *rng.sample(IDS, 20)]
    rng.shuffle(calls)
    day_of: list[Observation] = []
    for n, customer in enumerate(calls):
        at = start + n * (8 * HOUR / len(calls))
        day_of.append(obs([customer], at, user="alice", lookup=True))
        tickets = [customer * 10 + t for t in range(3)]  # WHERE customer_id = ...
        day_of.append(obs(tickets, at + 5, user="alice", table=TICKETS, lookup=True))
    for n in range(4):  # "recent tickets": the newest 50, ten new ones since the last look
        newest = 900_000 + day * 40 + n * 10
        at = start + n * 2 * HOUR + 60
        day_of.append(obs(range(newest - 49, newest + 1), at, user="alice", table=TICKETS))
        if n == 2:  # and once a day the second page of it
            older = range(newest - 99, newest - 49)
            day_of.append(obs(older, at + 30, user="alice", table=TICKETS, paging=True))
    day_of.sort(key=lambda o: o.at)
    return [alert for o in day_of for alert in watcher.observe(o, rules)]


def test_an_honest_month_raises_nothing() -> None:
    watcher, rng = Watcher(), random.Random(7)
    raised = [a for day in range(30) for a in honest_day(watcher, day, rng, DEFAULT_RULES)]
    assert raised == []
    last_hour = 29 * DAY + 17 * HOUR
    assert 0 < measures(watcher, last_hour, user="alice")["lookups"] < 20
    assert 0 < measures(watcher, last_hour, TICKETS, user="alice")["lookups"] < 60


def test_keyset_id_walking_alerts_within_the_window() -> None:
    watcher = Watcher()
    raised = keyset_walk(watcher, start=31_337, pages=40, every_s=10.0)
    assert [(at, a.kind, a.count) for at, a in raised] == [(30.0, "id_run", 200)]  # 4th page
    alert = raised[0][1]
    assert (alert.user, alert.role, alert.table) == ("mallory", "support", CUSTOMERS)
    assert (alert.threshold, alert.window_s, alert.lock) == (200, HOUR, False)


def test_offset_paging_alerts_within_the_window() -> None:
    watcher, rng = Watcher(), random.Random(1)
    order = rng.sample(IDS, 2_000)  # ORDER BY full_name: ids in no useful order
    raised: list[tuple[int, str]] = []
    for page in range(30):
        rows = order[page * 50 : page * 50 + 50]
        alerts = watcher.observe(obs(rows, page * 20.0, paging=page > 0), DEFAULT_RULES)
        raised += [(page, a.kind) for a in alerts]
    assert raised == [(10, "offset_paging")]  # the 10th page with an OFFSET


def test_random_lookups_alert_at_the_hundredth_distinct_record() -> None:
    watcher, rng = Watcher(), random.Random(2)
    raised: list[tuple[int, Alert]] = []
    for n, customer in enumerate(rng.sample(IDS, 150)):
        alerts = watcher.observe(obs([customer], n * 24.0, lookup=True), DEFAULT_RULES)
        raised += [(n, a) for a in alerts]
    assert [(n, a.kind, a.count, a.threshold) for n, a in raised] == [(99, "lookups", 100, 100)]


def test_repeated_lookups_of_the_same_records_are_not_enumeration() -> None:
    watcher = Watcher()
    for n in range(1_000):
        assert watcher.observe(obs([n % 50 * 997], n * 3.0, lookup=True), DEFAULT_RULES) == []
    assert measures(watcher, 3_000.0) == {
        "lookups": 50,
        "id_run": 1,
        "offset_paging": 0,
        "records": 50,
    }


def test_rereading_a_page_with_offset_is_not_walking() -> None:
    watcher = Watcher()
    page = range(100, 150, 1)
    for n in range(30):
        assert watcher.observe(obs(page, n * 60.0, paging=True), DEFAULT_RULES) == []
    assert measures(watcher, 1_800.0)["offset_paging"] == 1
    assert watcher.observe(obs([], 1_900.0, paging=True), DEFAULT_RULES) == []  # empty page


# Rules


def test_a_walk_slower_than_the_window_raises_nothing() -> None:
    watcher = Watcher()
    assert keyset_walk(watcher, start=1, pages=30, every_s=20 * 60) == []  # 3 pages an hour
    assert measures(watcher, 29 * 20 * 60)["id_run"] == 150


def test_lookups_and_offset_pages_slower_than_the_window_raise_nothing() -> None:
    watcher, rng = Watcher(), random.Random(3)
    for n, customer in enumerate(rng.sample(IDS, 300)):  # 50 an hour for six hours
        assert watcher.observe(obs([customer], n * 72.0, lookup=True), DEFAULT_RULES) == []
    pages = rng.sample(IDS, 50 * 40)
    for page in range(40):  # one page every 7 minutes: at most 9 in any hour
        rows = pages[page * 50 : page * 50 + 50]
        at = 30 * HOUR + page * 7 * 60
        assert watcher.observe(obs(rows, at, paging=True), DEFAULT_RULES) == []


def test_the_window_is_strictly_newer_than_now_minus_window() -> None:
    watcher = Watcher()
    rules = AlertRules(window_s=100.0, id_run=3)
    watcher.observe(obs([1], 0.0), rules)
    watcher.observe(obs([2], 50.0), rules)
    assert watcher.observe(obs([3], 100.0), rules) == []  # key 1 left at exactly 100.0
    assert kinds(watcher.observe(obs([1], 100.5), rules)) == ["id_run"]


def test_reading_a_record_again_keeps_it_in_the_window() -> None:
    watcher = Watcher()
    rules = AlertRules(window_s=100.0, id_run=3)
    watcher.observe(obs([1], 0.0), rules)
    watcher.observe(obs([1, 2], 90.0), rules)
    assert kinds(watcher.observe(obs([3], 150.0), rules)) == ["id_run"]


def test_an_ongoing_walk_alerts_once_per_window_not_per_statement() -> None:
    watcher = Watcher()
    raised = keyset_walk(watcher, start=1, pages=360, every_s=30.0)  # three hours
    assert [(at, a.count) for at, a in raised] == [(90.0, 200), (3690.0, 6_000), (7290.0, 6_000)]
    assert keyset_walk(watcher, start=1, pages=1, every_s=1, at=3 * HOUR + 3690) == []  # stopped


def test_silence_ends_one_window_after_the_alert_even_after_a_pause() -> None:
    watcher = Watcher()
    assert len(keyset_walk(watcher, start=1, pages=4, every_s=1.0)) == 1
    assert keyset_walk(watcher, start=1_001, pages=4, every_s=1.0, at=HOUR - 10) == []
    assert len(keyset_walk(watcher, start=5_001, pages=4, every_s=1.0, at=2 * HOUR)) == 1


def test_forget_drops_the_window_and_the_alert_history() -> None:
    watcher = Watcher()
    assert len(keyset_walk(watcher, start=1, pages=5, every_s=1.0)) == 1
    watcher.forget("mallory")
    watcher.forget("nobody")
    assert watcher.state("mallory", 10.0) == {}
    assert len(keyset_walk(watcher, start=1, pages=4, every_s=1.0, at=10.0)) == 1


def test_users_are_watched_apart() -> None:
    watcher = Watcher()
    for page in range(6):  # two users alternate pages of one walk: 300 ids, 150 each
        user = ("mallory", "trudy")[page % 2]
        rows = range(1 + 50 * page, 51 + 50 * page)
        assert watcher.observe(obs(rows, page * 10.0, user=user), DEFAULT_RULES) == []
    assert measures(watcher, 60.0, user="trudy")["records"] == 150
    assert watcher.state("alice", 60.0) == {}


def test_tables_are_watched_apart() -> None:
    watcher = Watcher()
    rules = AlertRules(offset_pages=4)
    for page in range(6):
        table = (CUSTOMERS, TICKETS)[page % 2]
        rows = range(1 + 50 * page, 51 + 50 * page)
        assert watcher.observe(obs(rows, page * 10.0, table=table, paging=True), rules) == []
    assert len(watcher.observe(obs([999], 70.0, table=TICKETS, paging=True), rules)) == 1
    assert sorted(watcher.state("mallory", 70.0)) == [CUSTOMERS, TICKETS]


def test_every_kind_can_fire_on_one_statement_and_carries_the_lock_flag() -> None:
    watcher = Watcher()
    rules = AlertRules(distinct_lookups=5, id_run=5, offset_pages=1, action="lock")
    alerts = watcher.observe(obs(range(10, 15), 1.0, lookup=True, paging=True), rules)
    assert [(a.kind, a.count, a.threshold, a.lock) for a in alerts] == [
        ("lookups", 5, 5, True),
        ("id_run", 5, 5, True),
        ("offset_paging", 1, 1, True),
    ]


def test_none_disables_a_detector() -> None:
    watcher = Watcher()
    rules = AlertRules(distinct_lookups=None, id_run=None, offset_pages=None)
    assert watcher.observe(obs(range(1_000), 1.0, lookup=True, paging=True), rules) == []
    assert measures(watcher, 1.0)["id_run"] == 1_000


def test_non_integer_keys_count_as_records_but_not_for_id_runs() -> None:
    watcher = Watcher()
    rules = AlertRules(id_run=2)
    keys = ["(1,2)", "(1,3)", "007", "+8", "1.0", "a9", "12345678901234567890", "-0"]
    assert watcher.observe(obs(keys, 1.0, lookup=True), rules) == []
    assert measures(watcher, 1.0) == {
        "lookups": 8,
        "id_run": 0,
        "offset_paging": 0,
        "records": 8,
    }
    assert kinds(watcher.observe(obs(["-1", "0"], 2.0), rules)) == ["id_run"]
    assert [integer_key(k) for k in ("0", "-17", "4711", "9223372036854775807")] == [
        0,
        -17,
        4711,
        9223372036854775807,
    ]


def test_an_earlier_stamp_counts_as_now() -> None:
    watcher = Watcher()
    rules = AlertRules(window_s=100.0, id_run=3)
    watcher.observe(obs([1], 0.0), rules)
    watcher.observe(obs([2], 150.0), rules)  # key 1 left the window
    assert watcher.observe(obs([3], 120.0), rules) == []  # late: still at 150, key 1 stays out
    assert measures(watcher, 10.0)["records"] == 2


def test_state_prunes_to_now() -> None:
    watcher = Watcher()
    watcher.observe(obs(range(10), 0.0, lookup=True, paging=True), AlertRules(window_s=60.0))
    assert measures(watcher, 59.0) == {
        "lookups": 10,
        "id_run": 10,
        "offset_paging": 1,
        "records": 10,
    }
    assert watcher.state("mallory", 60.0) == {}


def test_memory_is_bounded_per_user_dropping_the_oldest() -> None:
    watcher = Watcher(max_keys_per_user=100)
    rules = AlertRules(id_run=None, distinct_lookups=None)
    keyset_walk(watcher, start=1, pages=20, every_s=1.0, rules=rules)
    watcher.observe(obs(["x"], 20.0, user="alice"), rules)  # other users keep their own bound
    assert measures(watcher, 20.0) == {
        "lookups": 0,
        "id_run": 100,  # 901..1000: the newest records
        "offset_paging": 0,
        "records": 100,
    }
    watcher.observe(obs(range(2_000, 2_060), 21.0, table=TICKETS, lookup=True), rules)
    tickets = measures(watcher, 21.0, TICKETS)
    assert tickets["records"] + tickets["lookups"] == 100
    assert measures(watcher, 21.0) == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": 0.0},
        {"distinct_lookups": 0},
        {"id_run": -1},
        {"offset_pages": 0},
        {"action": "refuse"},
    ],
)
def test_rules_refuse_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="alerts: "):
        AlertRules(**kwargs)  # type: ignore[arg-type]


def test_the_watcher_refuses_a_zero_bound() -> None:
    with pytest.raises(ValueError, match="max_keys_per_user"):
        Watcher(max_keys_per_user=0)


# Property: the incremental measures equal a brute-force count over the window

statements = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=40.0),  # time since the previous statement
        st.lists(st.one_of(st.integers(-5, 60), st.sampled_from(["(1,2)", "k"])), max_size=12),
        st.booleans(),  # lookup
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(statements, st.sampled_from([1.0, 30.0, 100.0]))
def test_measures_equal_brute_force(
    script: list[tuple[float, list[int | str], bool]], window_s: float
) -> None:
    watcher = Watcher()
    rules = AlertRules(window_s=window_s, distinct_lookups=None, id_run=None, offset_pages=None)
    history: list[tuple[float, list[int | str], bool]] = []
    at = 0.0
    for gap, keys, lookup in script:
        at += gap
        watcher.observe(obs(keys, at, lookup=lookup), rules)
        history.append((at, keys, lookup))
        recent = [(keys, lookup) for t, keys, lookup in history if t > at - window_s]
        numbers = {k for keys, _ in recent for k in keys if isinstance(k, int)}
        looked = {str(k) for keys, lookup in recent if lookup for k in keys}
        records = {str(k) for keys, _ in recent for k in keys}
        assert measures(watcher, at) == (
            {
                "lookups": len(looked),
                "id_run": longest_run(numbers),
                "offset_paging": 0,
                "records": len(records),
            }
            if records
            else {}
        )

"""N virtual routers on a simulated LAN in virtual time: elections, handoffs, partitions."""

from __future__ import annotations

from fractions import Fraction as F

from hypothesis import given, settings
from hypothesis import strategies as st

from sim import Segment, make_config
from vipd.core.packet import DropReason
from vipd.core.router import State
from vipd.core.timing import master_down_interval


def test_election_highest_priority_wins() -> None:
    seg = Segment()
    nodes = [seg.add(make_config(p, interval_cs=10)) for p in (100, 200, 150)]
    for n in nodes:
        seg.start(n)
    seg.run_for(2)
    assert seg.masters() == [nodes[1]]
    assert [n.holds_vips for n in nodes] == [False, True, False]
    # the priority 200 router won at exactly its Master_Down_Interval
    first = [e for e in seg.log if e[3] == "MASTER"]
    assert first[0][0] == master_down_interval(3, 200, 10)


def test_preemption_when_higher_priority_returns() -> None:
    seg = Segment()
    low, high = seg.add(make_config(100)), seg.add(make_config(200))
    seg.start(low)
    seg.run_for(5)
    assert seg.masters() == [low]
    seg.start(high)
    t_start = seg.now
    seg.run_for(10)
    assert seg.masters() == [high]
    took_over = [e[0] for e in seg.log if e[1] == str(high.address) and e[3] == "MASTER"]
    assert took_over == [t_start + master_down_interval(3, 200, 100)]
    assert not low.holds_vips


def test_no_preemption_when_disabled() -> None:
    seg = Segment()
    low, high = seg.add(make_config(100)), seg.add(make_config(200, preempt=False))
    seg.start(low)
    seg.run_for(5)
    seg.start(high)
    seg.run_for(20)
    assert seg.masters() == [low]


def test_equal_priority_tie_break_on_primary_address() -> None:
    seg = Segment()
    a = seg.add(make_config(100), "192.0.2.10")
    b = seg.add(make_config(100), "192.0.2.20")
    # both become master at once (same start, same priority), then the higher address wins
    seg.start(a)
    seg.start(b)
    seg.run_for(10)
    assert seg.masters() == [b]


def test_priority_zero_handoff_waits_skew_time_only() -> None:
    seg = Segment()
    a, b = seg.add(make_config(200)), seg.add(make_config(100))
    seg.start(a)
    seg.start(b)
    seg.run_for(10)
    assert seg.masters() == [a]
    t_stop = seg.now
    seg.stop(a)
    seg.run_for(5)
    assert seg.masters() == [b]
    took = [e[0] for e in seg.log if e[1] == str(b.address) and e[3] == "MASTER"]
    assert took == [t_stop + F(156 * 100, 256) / 100]  # Skew_Time for priority 100 at 1 s


def test_crash_then_backup_takes_over_after_master_down_interval() -> None:
    seg = Segment()
    a, b = seg.add(make_config(200, interval_cs=10)), seg.add(make_config(100, interval_cs=10))
    seg.start(a)
    seg.start(b)
    seg.run_for(2)
    seg.crash(a)
    last_advert = b.router.master_heard_at
    assert last_advert is not None
    seg.run_for(2)
    assert seg.masters() == [b]
    took = [e[0] for e in seg.log if e[1] == str(b.address) and e[3] == "MASTER"]
    assert len(took) == 1 and took[0] - last_advert <= master_down_interval(3, 100, 10)


def test_partition_gives_two_masters_and_heal_gives_one() -> None:
    seg = Segment()
    a, b, c = (seg.add(make_config(p, interval_cs=10)) for p in (200, 150, 100))
    for n in (a, b, c):
        seg.start(n)
    seg.run_for(2)
    assert seg.masters() == [a]
    seg.partition([a], [b, c])
    seg.run_for(2)
    assert seg.masters() == [a, b]
    seg.heal()
    seg.run_for(F(1, 10))
    assert seg.masters() == [a]
    assert not b.holds_vips
    assert b.router.last_transition is not None
    assert b.router.last_transition.cause == f"higher priority master {a.address} (200)"


def test_v2_peer_dropped_by_default_and_accepted_in_compat_mode() -> None:
    seg = Segment()
    v2 = seg.add(make_config(200, version=2))
    v3 = seg.add(make_config(100, version=3))
    seg.start(v2)
    seg.start(v3)
    seg.run_for(10)
    # RFC 5798 8.4: without compatibility each ignores the other: two masters
    assert seg.masters() == [v2, v3]
    assert v3.drops[DropReason.VERSION] > 0 and v2.drops[DropReason.VERSION] > 0

    seg = Segment()
    v2 = seg.add(make_config(200, version=2))
    v3 = seg.add(make_config(100, version=3, accept_v2=True))
    seg.start(v2)
    seg.start(v3)
    seg.run_for(10)
    assert seg.masters() == [v2]
    assert v3.router.master_adver_interval_cs == 100  # v2's 1 s in centiseconds


def test_v2_interval_mismatch_is_dropped() -> None:
    seg = Segment()
    a = seg.add(make_config(200, version=2, interval_cs=100))
    b = seg.add(make_config(100, version=2, interval_cs=200))
    seg.start(a)
    seg.start(b)
    seg.run_for(10)
    assert len(seg.masters()) == 2
    assert b.drops[DropReason.V2_INTERVAL_MISMATCH] > 0


def test_mixed_checksum_variants_interoperate() -> None:
    from vipd.core.packet import ChecksumVariant

    seg = Segment()
    a = seg.add(make_config(200, checksum=ChecksumVariant.RFC9568))
    b = seg.add(make_config(100, checksum=ChecksumVariant.PSEUDO_HEADER))
    seg.start(a)
    seg.start(b)
    seg.run_for(10)
    assert seg.masters() == [a]
    assert b.router.peers[a.address].checksum is ChecksumVariant.RFC9568


@settings(max_examples=150, deadline=None)
@given(
    priorities=st.lists(st.integers(1, 254), min_size=2, max_size=6, unique=True),
    offsets=st.lists(st.integers(0, 500), min_size=6, max_size=6),
    interval_cs=st.sampled_from([1, 10, 100]),
)
def test_property_exactly_one_master(priorities: list[int], offsets: list[int],
                                     interval_cs: int) -> None:
    """Distinct priorities, connected segment, any start times: from the last start plus
    Master_Down_Interval plus one advert interval on, exactly one master, the highest."""
    seg = Segment()
    nodes = [seg.add(make_config(p, interval_cs=interval_cs)) for p in priorities]
    starts = sorted(zip((F(o, 100) for o in offsets), range(len(nodes)), strict=False))
    for t, i in starts:
        seg.run_until(t)
        seg.start(nodes[i])
    last_start = seg.now
    mdi = max(master_down_interval(3, p, interval_cs) for p in priorities)
    settle = last_start + mdi + F(interval_cs, 100)
    seg.run_until(settle)
    best = max(nodes, key=lambda n: n.router.config.priority)

    def one_master(s: Segment) -> None:
        assert s.masters() == [best]
        assert [n for n in s.nodes if n.holds_vips] == [best]

    one_master(seg)
    seg.run_for(F(interval_cs, 10), check=one_master)
    assert all(n.state in (State.MASTER, State.BACKUP) for n in nodes)

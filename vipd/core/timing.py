"""VRRP timer arithmetic, exact (Fractions of a second), and the one place units convert.

RFC 9568 6.1 (v3):  Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256
                    Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time
RFC 3768 6.1 (v2):  Skew_Time = (256 - Priority) / 256 seconds
                    Master_Down_Interval = 3 * Advertisement_Interval + Skew_Time
Nothing is truncated to whole centiseconds: a priority 1 backup at 10 ms waits 39.9609375 ms.
"""

from __future__ import annotations

import functools
from fractions import Fraction

Seconds = Fraction


def cs_to_s(cs: int) -> Seconds:
    """Centiseconds (the v3 wire unit) to seconds."""
    return Fraction(cs, 100)


def cs_to_ms(cs: int) -> int:
    return cs * 10


def s_to_cs(s: int) -> int:
    """Whole seconds (the v2 wire unit) to centiseconds."""
    return s * 100


def cs_to_whole_s(cs: int) -> int:
    """Centiseconds to the whole seconds a VRRPv2 advert carries (config ensures whole)."""
    return cs // 100


def ms_to_s(ms: int | Fraction) -> Seconds:
    return Fraction(ms) / 1000


def s_to_ms(s: Fraction | float) -> float:
    return float(s) * 1000.0


@functools.lru_cache(maxsize=4096)
def skew_time(version: int, priority: int, master_adver_interval_cs: int) -> Seconds:
    if version == 2:
        return Fraction(256 - priority, 256)
    return Fraction((256 - priority) * master_adver_interval_cs, 256) / 100


@functools.lru_cache(maxsize=4096)  # pure and called per advert: Fraction math is slow
def master_down_interval(version: int, priority: int, master_adver_interval_cs: int) -> Seconds:
    return 3 * cs_to_s(master_adver_interval_cs) + skew_time(
        version, priority, master_adver_interval_cs
    )

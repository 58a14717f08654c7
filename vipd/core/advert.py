"""The bridge between one virtual router's configuration and the wire codec: how its
adverts are encoded and what the receive checks compare against. Pure."""

from __future__ import annotations

from ipaddress import IPv4Address

from vipd.core.actions import SendAdvert
from vipd.core.packet import IPAddress, ReceiverView, encode_v2, encode_v3
from vipd.core.router import RouterConfig
from vipd.core.timing import cs_to_whole_s


def encode_advert(config: RouterConfig, act: SendAdvert, src: IPAddress,
                  dst: IPAddress | None = None) -> bytes:
    """The payload for a SendAdvert of this router (v2 or v3, its checksum variant), to
    the multicast group or a unicast peer `dst`."""
    if config.version == 2:
        return encode_v2(vrid=config.vrid, priority=act.priority,
                         adver_int_s=cs_to_whole_s(act.interval_cs),
                         addresses=[a for a in config.addresses if isinstance(a, IPv4Address)])
    return encode_v3(vrid=config.vrid, priority=act.priority, max_adver_int_cs=act.interval_cs,
                     addresses=config.addresses, src=src, dst=dst, variant=config.checksum)


def receiver_view(config: RouterConfig, peers: tuple[IPAddress, ...] = ()) -> ReceiverView:
    """`peers`: unicast peers, the only senders heard (none: anyone, multicast)."""
    return ReceiverView(config.vrid, config.version, frozenset(config.addresses),
                        config.advert_interval_cs, config.accept_v2,
                        frozenset(peers) if peers else None)

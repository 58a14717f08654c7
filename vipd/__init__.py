"""vipd: VRRP failover with connection-state sync for Linux routers and firewalls."""

__version__ = "0.1.0"

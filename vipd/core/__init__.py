"""Pure protocol cores: no sockets, no clocks, no asyncio (see docs/architecture.md)."""

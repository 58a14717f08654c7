"""Pure protocol cores: no sockets, no clocks, no asyncio (see ../shared/design.md)."""

"""The daemon's driver, split by ownership: the loop (daemon.py), carrying out the node
core's actions (executor.py), link watching (links.py), control commands and status
(commands.py), and the entry point (main.py)."""

from vipd.runtime.daemon import Daemon
from vipd.runtime.main import run

__all__ = ["Daemon", "run"]

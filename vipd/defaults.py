"""Defaults shared by the daemon and vipctl, in a module that imports nothing (vipctl
starts fast: importing the configuration loader alone took 56 ms)."""

DEFAULT_CONTROL_SOCKET = "/run/vipd/vipd.sock"

"""Thin I/O adapters: one module per kernel touchpoint, each with an in-memory fake."""

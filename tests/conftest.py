"""Shared test settings."""

from hypothesis import settings

# No per-example time limit: a loaded CI machine must not turn a slow example into a
# failure (speed is measured by the benchmark scripts, not here).
settings.register_profile("vipd", deadline=None, print_blob=True)
settings.load_profile("vipd")

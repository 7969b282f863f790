"""Shared test set-up: hypothesis profiles.

``ci`` (the default) is derandomized, so a run is reproducible and its time is
stable; ``explore`` draws fresh random examples and more of them. Pick one with
``HYPOTHESIS_PROFILE=explore python -m pytest tests``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

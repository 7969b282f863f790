"""Shared test set-up: hypothesis profiles, and Triton's interpreter on machines without a GPU.

``ci`` (the default) is derandomized, so a run is reproducible and its time is
stable; ``explore`` draws fresh random examples and more of them. Pick one with
``HYPOTHESIS_PROFILE=explore python -m pytest tests``.
"""

import os

import torch
from hypothesis import HealthCheck, settings

# Triton decides when a function is decorated whether @triton.jit interprets it, and decorates its
# own library (tl.zeros, tl.cdiv) when triton.language is first imported, which collecting a module
# that touches torch.compile already does. Without a GPU the kernel tests run in the interpreter
# (test_triton.py), so it must be on before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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

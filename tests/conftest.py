"""Shared pytest setup: Hypothesis profiles and the ``device`` fixture (every test that takes it
runs on the CPU and, when one is visible, on CUDA).

Profiles (select with HYPOTHESIS_PROFILE=ci|dev; `make test` uses ci):
  ci   bounded and derandomized, so CI is reproducible and the suite stays
       well under 10 minutes on 2 cores;
  dev  many more examples, for local bug hunting.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Session-scoped: it is only a name, nothing to reset, so @given tests may take it too.
@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    return request.param

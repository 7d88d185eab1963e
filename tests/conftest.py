"""Shared pytest setup for the sparse_attn suite.

TRITON_INTERPRET must be set before anything imports triton (the ``@triton.jit`` decorators read it
when the kernels are defined), so it is set first, before any other import.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=40,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=200, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SEED = 0


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch (and random / numpy) identically before every test; returns the seed."""
    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    return SEED

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs >= 200 examples per property (the floor); "dev" is for quick local loops.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=200, derandomize=False, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("sanitizer", max_examples=10, **_common)  # compute-sanitizer is ~100x slower
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return "cuda"

import os
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))
# The latency planner's on-disk timing cache goes to a fresh folder, never the user's ~/.cache.
os.environ["CONVFACTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="convfactor-cache-")

# Deterministic property tests: same examples every run, no deadline flakiness on a loaded 2-core CI.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield

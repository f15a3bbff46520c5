import os

import torch

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
# the thorough profile (>= 500 examples per property) is derandomised under CI, so CI's run is reproducible
settings.register_profile("thorough", max_examples=500, deadline=None, derandomize=bool(os.environ.get("CI")),
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

# The tests run small tensors, where torch's intra-op OpenMP only costs: under CPU contention a 4096-element
# exp waits ~10 ms for the second thread (measured), against ~10 us single-threaded.
torch.set_num_threads(1)

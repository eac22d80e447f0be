"""Root conftest: applies to the whole suite (host tests, SDK tests, every plugin's tests)."""

import torch

# Tiny models run fastest on one thread, and CI's 2 cores are shared with the test process itself:
# two threads made a tiny FLUX.2 call 5-50x slower under load.
torch.set_num_threads(1)

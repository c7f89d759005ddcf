"""Library behind the speedrun pipeline: one concept per module, stages/ stays thin."""
import os

# The record's own setting, set before torch's CUDA allocator starts: its three stages train on
# different batch shapes, and fixed-size segments cached for each leave the reserved memory far
# above the live peak, too close to a 24 GB card's (benchmarks/results/README.md). setdefault: a
# user's own allocator settings win.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

"""cai: Constitutional AI from a versioned YAML constitution to aligned data and models."""

import os

# Busy-waiting OpenMP threads stall torch badly on small shared CPUs; this only
# takes effect if set before torch is first imported, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

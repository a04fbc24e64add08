"""Test set-up: 4 forced host CPU devices, so mesh/sharding code runs on a real multi-device mesh.

XLA_FLAGS must be set before JAX initialises its backends, hence here, at collection time.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

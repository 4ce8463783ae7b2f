"""Suite-wide set-up that must happen before any test module imports torch."""

from __future__ import annotations

import os

# The tests run torch in this process and in the workers, nodes and tools they start, on few
# cores, so torch's threads oversubscribe the CPU.  Spinning OpenMP threads then slow every
# process down several times over; sleeping ones do not (see docs/benchmarks.md).  The child
# processes inherit the setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

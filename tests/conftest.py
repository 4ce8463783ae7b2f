"""Suite-wide set-up that must happen before any test module imports torch."""

from __future__ import annotations

import os

# The tests run torch in this process and in the workers, nodes and tools they start, on few
# cores.  Spinning OpenMP threads then slow everything down many times over; sleeping ones do
# not (the `coronet` command sets the same default for the same reason).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

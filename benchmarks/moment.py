"""The machine moment a benchmark's numbers come from (timings on this machine class drift 2-4x with
load): one line with the load average and the UTC time, printed at the end of each script's table."""

from __future__ import annotations

import os
import time


def moment_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")

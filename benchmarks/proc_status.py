"""Memory figures of this process from /proc/self/status (Linux), for the benchmarks."""
from __future__ import annotations


def status_kib(field: str) -> int | None:
    """The value of `field` ("VmRSS", "VmHWM", ...) in KiB, or None where /proc is not there."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None

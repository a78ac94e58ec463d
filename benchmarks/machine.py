"""What machine a benchmark ran on, for its header: results from different CPUs are not comparable."""
from __future__ import annotations


def cpu_name() -> str:
  """The processor's model name from /proc/cpuinfo ('?' where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "?"

"""Host memory on CPU: let glibc's malloc back large buffers with transparent huge pages.

XLA:CPU allocates the temporaries of a compiled program afresh on every execution, and glibc serves such
large blocks by mmap and returns them on free, so every train step faults its whole working set back in,
4 KiB at a time (shunted_t at batch 8: 645,000 page faults and 1.3 s of kernel time per 2.1 s step). With
the glibc tunable `glibc.malloc.hugetlb=1` malloc asks for transparent huge pages (2 MiB), which cuts the
faults 100-300 fold. Measured with `benchmarks/speed.py`, both frameworks under the same setting: shunted_t
train step 1.61x faster, DeiT-S 1.09x; PyTorch gains too (shunted_t forward 1.52x).

glibc reads tunables only at process start, so `main.py` re-executes itself with the tunable set
(`maybe_reexec_with_huge_pages`) when JAX can only run on the CPU: no accelerator plugin installed or
`JAX_PLATFORMS=cpu`. It does nothing on other C libraries, when the kernel's THP mode is 'never', or with
`VIT_JAX_FIX_HUGEPAGES=0`. This module imports nothing heavy, so the re-exec happens before JAX loads.
"""
from __future__ import annotations

import importlib.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "VIT_JAX_FIX_HUGEPAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# Packages that give JAX an accelerator backend; with one installed the re-exec is left to the user.
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "jax_plugins")


def thp_mode() -> str:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or 'unavailable'."""
  try:
    text = open(THP_SETTING).read()
  except OSError:
    return "unavailable"
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else text.strip()


def huge_pages_requested(env=None) -> bool:
  """Whether GLIBC_TUNABLES already sets the hugetlb tunable (to any value: the user's choice stands)."""
  return TUNABLE.split("=")[0] in (os.environ if env is None else env).get("GLIBC_TUNABLES", "")


def env_with_huge_pages(env=None) -> dict:
  """A copy of `env` (default: os.environ) whose GLIBC_TUNABLES also holds `TUNABLE`."""
  env = dict(os.environ if env is None else env)
  if not huge_pages_requested(env):
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), TUNABLE) if t)
  return env


def cpu_only() -> bool:
  """Whether JAX can only use the CPU here, decided without importing JAX."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  return not any(importlib.util.find_spec(p) is not None for p in ACCELERATOR_PLUGINS)


def should_reexec(env=None) -> bool:
  env = os.environ if env is None else env
  return (sys.platform.startswith("linux") and env.get(OPT_OUT, "1") != "0" and not huge_pages_requested(env)
          and thp_mode() in ("always", "madvise") and cpu_only())


def maybe_reexec_with_huge_pages(argv: list[str]) -> None:
  """Replace this process by `python argv...` with huge-page malloc, when `should_reexec()`; else return.
  The environment variable it sets also stops the new process from doing it again."""
  if not should_reexec():
    return
  print(f"vit_jax_fix: CPU-only JAX, restarting with GLIBC_TUNABLES={TUNABLE} (huge-page malloc, faster "
        f"steps on XLA:CPU; {OPT_OUT}=0 turns this off)", file=sys.stderr, flush=True)
  os.execve(sys.executable, [sys.executable, *argv], env_with_huge_pages())

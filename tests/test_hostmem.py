"""Huge-page malloc on CPU (vit_jax_fix/hostmem.py): the environment it sets, when main.py re-executes, and
that the setting does cut the page faults that fresh buffers cost on every step."""
import os
import subprocess
import sys
import textwrap

import pytest

from vit_jax_fix import hostmem

LINUX = sys.platform.startswith("linux")


def test_env_with_huge_pages_keeps_other_tunables_and_an_explicit_choice():
  assert hostmem.env_with_huge_pages({})["GLIBC_TUNABLES"] == hostmem.TUNABLE
  env = hostmem.env_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostmem.TUNABLE and env["X"] == "1"
  # A user who set the tunable (even to 0) keeps it.
  assert hostmem.env_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == \
      "glibc.malloc.hugetlb=0"


def test_should_reexec_only_for_cpu_only_jax_without_opt_out(monkeypatch):
  monkeypatch.setattr(hostmem, "thp_mode", lambda: "madvise")
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(hostmem.OPT_OUT, raising=False)
  assert hostmem.should_reexec()
  monkeypatch.setenv(hostmem.OPT_OUT, "0")
  assert not hostmem.should_reexec()
  monkeypatch.delenv(hostmem.OPT_OUT)
  monkeypatch.setenv("GLIBC_TUNABLES", hostmem.TUNABLE)          # already restarted: no loop
  assert not hostmem.should_reexec()
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")                  # an accelerator: left to the user
  assert not hostmem.should_reexec()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(hostmem, "thp_mode", lambda: "never")
  assert not hostmem.should_reexec()
  monkeypatch.setattr(hostmem, "thp_mode", lambda: "madvise")
  monkeypatch.setattr(sys, "platform", "darwin")
  assert not hostmem.should_reexec()


SCRIPT = textwrap.dedent("""
    import os, resource, sys
    from vit_jax_fix import hostmem
    if __name__ == "__main__":
      hostmem.maybe_reexec_with_huge_pages(sys.argv)
    import ctypes
    libc = ctypes.CDLL(None)                # plain malloc, as XLA:CPU (numpy madvises on its own)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):                      # like XLA:CPU's per-step temporaries: allocate, touch, free
      buf = libc.malloc(64 << 20)
      ctypes.memset(buf, 1, 64 << 20)
      libc.free(buf)
    print(os.environ.get("GLIBC_TUNABLES", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
          sys.argv[1:])
""")


@pytest.mark.skipif(not LINUX, reason="glibc tunables")
def test_reexec_sets_the_tunable_once_and_cuts_page_faults(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(SCRIPT)
  base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}

  def run(**env):
    proc = subprocess.run([sys.executable, str(script), "--flag", "x y"], capture_output=True, text=True,
                          env={**base, "JAX_PLATFORMS": "cpu", **env}, check=True, timeout=120)
    tunables, faults, argv = proc.stdout.split(" ", 2)
    return tunables, int(faults), argv.strip(), proc.stderr

  tunables, faults_off, argv, err = run(**{hostmem.OPT_OUT: "0"})
  assert tunables == "" and "restarting" not in err and argv == "['--flag', 'x y']"
  if hostmem.thp_mode() not in ("always", "madvise"):
    pytest.skip(f"transparent huge pages are '{hostmem.thp_mode()}' here: no re-exec")
  tunables, faults_on, argv, err = run()
  assert tunables == hostmem.TUNABLE and argv == "['--flag', 'x y']"   # same arguments after the exec
  assert err.count("restarting with GLIBC_TUNABLES") == 1
  if hostmem.thp_mode() == "madvise":
    # 5 x 64 MiB written: ~82,000 faults with 4 KiB pages, a few hundred with 2 MiB pages.
    assert faults_off > 50_000 and faults_on < faults_off / 10, (faults_off, faults_on)

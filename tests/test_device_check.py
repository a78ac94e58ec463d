"""benchmarks/device_check.py in its CPU smoke mode (tiny models, one call each): every section runs, the
results are written, and the attention variants really trace different kernels choices."""
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_check  # noqa: E402


def test_device_check_smoke(tmp_path):
  res = device_check.main(["--smoke", "--out", str(tmp_path)])
  assert res["backend"] == "cpu" and not res["skipped"]
  sections = {e["section"] for e in res["configs"]}
  assert sections == {"throughput", "attention", "circulant"}
  for e in res["configs"]:
    for what in e.get("what", ("fwd", "train")):
      r = e[what]
      assert r["img_s"] > 0 and r["compile_s"] > 0 and r["batch"] == 2, (e, what)
      assert r["mfu_gemm"] > 0 and r["mfu_peak"] is None   # no peak listed for a CPU
    assert e["flops_per_image"]["fwd"] > 0
  assert any("train" in e for e in res["configs"])
  saved = json.loads((tmp_path / "device_check.json").read_text())
  assert len(saved["configs"]) == len(res["configs"])
  md = (tmp_path / "device_check.md").read_text()
  assert "evit_0.7 fp32: fused xla / explicit" in md and "augvit fp32: FFT / dense circulant" in md
  # FLOPs of the same model do not depend on the attention kernel: XLA counts the same work.
  evit = [e["flops_per_image"]["fwd"] for e in res["configs"] if e["model"] == "evit_0.7"]
  assert len(evit) == 2


def test_peak_table_and_batches():
  assert device_check.peak_for("NVIDIA H100 80GB HBM3", "bf16") == 989e12
  assert device_check.peak_for("NVIDIA H100 PCIe", "bf16") == 756e12
  assert device_check.peak_for("TPU v5 lite", "bf16") == 197e12
  assert device_check.peak_for("cpu", "fp32") is None
  # 80 GiB: 5x the 16 GiB base, rounded down to a power of two.
  assert device_check.batch_for("deit", True, 80 * 2 ** 30, False) == 256
  assert device_check.batch_for("deit", False, None, False) == 256
  assert device_check.batch_for("shunted_t", True, 80 * 2 ** 30, True) == 2

"""Importing torch-side packages (timm) beside the pinned CPU torch.

The torchvision 0.28.0 wheel on PyPI is a CUDA build: next to the CPU build of torch 2.13.0 its compiled
operators do not load, and its meta registrations then fail at import with "operator torchvision::nms does
not exist" (timm imports torchvision). Declaring the schemas of the two operators those registrations touch
(`nms`, `qnms`) before the import lets torchvision and timm import; only compiled torchvision operators
(nms, roi_align, image/video decoding) stay unavailable, and nothing in this project uses them. The fragment
is declared only when `torch.ops.torchvision.nms` is missing, so a working torchvision is left untouched.

Every module and test of this project imports timm through `import_timm()`.
"""
from __future__ import annotations

_FRAGMENT = None  # keeps the torch.library.Library alive (its definitions die with it)
_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def _has_nms(torch) -> bool:
  try:
    torch.ops.torchvision.nms
    return True
  except (AttributeError, RuntimeError):
    return False


def ensure_torchvision_ops():
  """Declare the `torchvision::nms` / `qnms` schemas when the installed torchvision cannot provide them."""
  global _FRAGMENT
  import torch
  if _FRAGMENT is not None or _has_nms(torch):
    return
  try:
    import torchvision  # noqa: F401  (a working build registers its own ops)
  except RuntimeError:
    pass
  if _has_nms(torch):
    return
  lib = torch.library.Library("torchvision", "DEF")
  for op in ("nms", "qnms"):
    lib.define(op + _SCHEMA)
  _FRAGMENT = lib


def import_timm():
  """Import and return timm (raises ImportError with the install hint when torch/timm are missing)."""
  try:
    import torch  # noqa: F401
  except ImportError as e:
    raise ImportError("PyTorch interop needs torch: pip install 'vit_jax_fix[interop-timm]' "
                      "(torch==2.13.0 torchvision==0.28.0 timm==1.0.31)") from e
  ensure_torchvision_ops()
  try:
    import timm
  except ImportError as e:
    raise ImportError("timm is not installed: pip install 'vit_jax_fix[interop-timm]' "
                      "(pin torchvision==0.28.0 so pip keeps the CPU torch)") from e
  return timm

"""RegNetY (models/regnet.py), DeiT's teacher: timm's regnety_160 at full size (parameter count, keys and
shapes) and a tiny-width RegNetY of the same structure (logits both ways, DeiT's {'model': ...} file)."""
import numpy as np
from flax import nnx

import vit_jax_fix
from vit_jax_fix.interop import testing, to_torch_state_dict, torch_keys
from vit_jax_fix.interop.torch_compat import import_timm
from vit_jax_fix.models.registry import count_params, get_spec

timm = import_timm()
import torch  # noqa: E402  (after import_timm, which prepares torchvision)
from timm.models.regnet import RegNet, RegNetCfg  # noqa: E402

# Four stages of 1, 1, 2, 1 blocks (widths 8, 16, 32, 64; group width 8: 1 to 8 groups), SE on.
TINY = dict(w0=8, wa=12.0, wm=2.0, group_size=8, depth=5, se_ratio=0.25, stem_width=8, num_classes=10)


def test_regnety_160_count_keys_and_shapes_equal_timm():
  model = nnx.eval_shape(lambda: vit_jax_fix.create_model("regnety_160"))
  assert count_params(model) == 83_590_140
  ref = timm.create_model("regnety_160", pretrained=False)
  assert torch_keys(model, layout="timm") == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert get_spec("regnety_160").weights.file_name == "regnety_160-a5fe301d.pth"


def _timm_tiny():
  torch.manual_seed(0)
  kw = {k: v for k, v in TINY.items() if k != "num_classes"}
  m = RegNet(RegNetCfg(**kw), num_classes=TINY["num_classes"])
  with torch.no_grad():       # move BN statistics, gammas and biases away from their init
    for name, t in m.state_dict().items():
      if t.dtype.is_floating_point:
        t.add_(0.2 * torch.randn_like(t).abs() if name.endswith("running_var") else 0.2 * torch.randn_like(t))
  return m.eval()


def _images(seed=0):
  x = np.random.default_rng(seed).normal(size=(2, 32, 32, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def test_tiny_regnety_logits_equal_timm_both_ways(tmp_path):
  tm = _timm_tiny()
  assert [len(list(s.children())) for s in (tm.s1, tm.s2, tm.s3, tm.s4)] == [1, 1, 2, 1]
  x, xt = _images()
  with torch.no_grad():
    ref = tm(xt).numpy()
  # timm -> ours, through DeiT's teacher-file wrapper ({'model': state_dict}) and the weight-file loader
  path = tmp_path / "teacher.pth"
  torch.save({"model": tm.state_dict()}, path)
  from vit_jax_fix.interop.checkpoint_io import load_torch
  ours, _ = load_torch(str(path), "regnety_160", TINY, layout="timm")
  np.testing.assert_allclose(testing.logits(ours, x), ref, atol=1e-4, rtol=1e-4)
  # ours -> timm (strict)
  back = RegNet(RegNetCfg(**{k: v for k, v in TINY.items() if k != "num_classes"}), num_classes=10).eval()
  back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(ours).items()}, strict=True)
  with torch.no_grad():
    np.testing.assert_allclose(back(xt).numpy(), ref, atol=1e-4, rtol=1e-4)

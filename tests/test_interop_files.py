"""Weight files: golden (official-layout) state_dicts through .safetensors/.pth with metadata, checkpoint
wrappers and prefixes, the weights_only policy, mismatch reports, and the convert CLI both ways."""
import argparse
import json

import numpy as np
import pytest

from tests import golden
from vit_jax_fix.interop import StateDictMismatch, from_torch_state_dict, to_torch_state_dict
from vit_jax_fix.interop.checkpoint_io import (UnsafeCheckpoint, load_torch, read_state_dict, save_torch,
                                               unwrap_state_dict, write_state_dict)
from vit_jax_fix.interop.official import official_overrides
from vit_jax_fix.interop.testing import random_model
from vit_jax_fix.interop.torch_compat import import_timm

import_timm()
import torch  # noqa: E402


def golden_case(case):
  meta, state, _ = golden.load(case)
  name = golden.registered_name(meta)
  try:
    overrides = official_overrides(name, **meta["constructor"]["kwargs"])
  except (ImportError, KeyError) as e:  # a family still being written elsewhere
    pytest.skip(f"{case}: {e}")
  return name, overrides, state


def assert_same_state(got, ref):
  assert sorted(got) == sorted(ref)
  for k, v in ref.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("case", golden.cases())
def test_golden_through_safetensors_both_ways(case, tmp_path):
  """golden dict -> model -> file (metadata) -> golden dict exactly; file -> model (name from metadata)."""
  name, overrides, state = golden_case(case)
  model = random_model(name, **overrides)
  from_torch_state_dict(model, state)
  path = tmp_path / "m.safetensors"
  meta = save_torch(model, str(path), name=name, overrides=overrides, layout="official")
  sd, info = read_state_dict(str(path))
  assert_same_state(sd, state)
  fm = info["metadata"]
  assert fm["format"] == "pt" and fm["model_name"] == name and fm["layout"] == "official"
  assert fm["model_kwargs"] == json.loads(json.dumps(overrides))
  assert fm["img_size"] == meta["img_size"] and len(fm["mean"]) == 3 and fm["interpolation"]
  back, info = load_torch(str(path))  # no name: taken from the metadata
  assert info["name"] == name
  assert_same_state(to_torch_state_dict(back), state)


def test_metadata_carries_preprocessing_and_timm_call(tmp_path):
  model = random_model("deit_small_patch16_LS", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                       num_classes=10)
  path = tmp_path / "d3.safetensors"
  save_torch(model, str(path), overrides=dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                                              num_classes=10))
  from safetensors import safe_open
  with safe_open(str(path), framework="numpy") as f:
    raw = f.metadata()
  assert raw["format"] == "pt" and raw["layout"] == "timm" and raw["timm_model"] == "deit3_small_patch16_224"
  assert json.loads(raw["img_size"]) == [32, 32] and json.loads(raw["input_size"]) == [3, 32, 32]
  assert json.loads(raw["crop_pct"]) == 1.0 and raw["interpolation"] == "bicubic"
  assert json.loads(raw["mean"]) == pytest.approx([0.485, 0.456, 0.406])
  assert json.loads(raw["timm_kwargs"])["no_embed_class"] is True
  assert "pretrained_cfg_overlay=dict(file=PATH, num_classes=10)" in raw["timm_create"]


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "state_dict_ema", "module_prefix"])
def test_pth_wrappers_and_prefixes(wrap, tmp_path):
  name, overrides, state = golden_case("augvit_circulant2")
  tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
  obj = {"bare": tensors, "model": {"model": tensors, "epoch": 3}, "state_dict": {"state_dict": tensors},
         "state_dict_ema": {"state_dict_ema": tensors, "optimizer": {"lr": 0.1}},
         "module_prefix": {"model": {"module." + k: v for k, v in tensors.items()}}}[wrap]
  path = tmp_path / "w.pth"
  torch.save(obj, str(path))
  model, info = load_torch(str(path), name, overrides)
  assert info["wrapper"] == ("" if wrap == "bare" else "model" if wrap == "module_prefix" else wrap)
  assert info["prefix"] == ("module." if wrap == "module_prefix" else "")
  assert_same_state(to_torch_state_dict(model), state)


def test_ema_choice():
  raw = {"w": np.zeros(2, np.float32)}
  ema = {"w": np.ones(2, np.float32)}
  both = {"model": raw, "model_ema": ema}
  assert unwrap_state_dict(both)[1] == "model"
  assert unwrap_state_dict(both, ema=True)[1] == "model_ema"
  assert unwrap_state_dict({"state_dict_ema": ema})[1] == "state_dict_ema"  # the only weights
  with pytest.raises(ValueError, match="no EMA weights"):
    unwrap_state_dict({"model": raw}, ema=True)
  with pytest.raises(ValueError, match="no state_dict found"):
    unwrap_state_dict({"epoch": 3, "args": "x"})


def test_pickled_objects_are_refused_unless_allowed(tmp_path):
  name, overrides, state = golden_case("evit_k07_fuse")
  path = tmp_path / "evit.pth"
  torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in state.items()},
              "args": argparse.Namespace(lr=5e-4, model=name)}, str(path))
  with pytest.raises(UnsafeCheckpoint, match=r"allow_pickle=True.*--allow-pickle|--allow-pickle"):
    read_state_dict(str(path))
  sd, info = read_state_dict(str(path), allow_pickle=True)
  assert info["wrapper"] == "model"
  assert_same_state(sd, state)


def test_pth_written_by_us_reads_back_with_metadata(tmp_path):
  name, overrides, state = golden_case("deepvit_cnn_stem")  # has BatchNorm buffers
  path = write_state_dict(str(tmp_path / "x.pth"), state, {"model_name": name, "model_kwargs": overrides})
  obj = torch.load(path, weights_only=True)
  assert set(obj) == {"state_dict", "metadata"} and obj["metadata"]["model_name"] == name
  model, info = load_torch(path)
  assert info["wrapper"] == "state_dict"
  assert_same_state(to_torch_state_dict(model), state)


def test_mismatches_fail_with_a_list(tmp_path):
  name, overrides, state = golden_case("vit_deit")
  # wrong depth: the checkpoint has 4 blocks, the model 3
  with pytest.raises(StateDictMismatch, match=r"unexpected keys \(12\):\n  blocks\.3\.") as err:
    from_torch_state_dict(random_model(name, **dict(overrides, depth=3)), state)
  assert "blocks.3.norm1.weight" in str(err.value) and "missing" not in str(err.value)
  # missing keys
  partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.mlp")}
  with pytest.raises(StateDictMismatch, match=r"missing keys \(4\):\n  blocks\.1\.mlp\.fc1\.bias\n  blocks\.1\.mlp\.fc1\.weight"):
    from_torch_state_dict(random_model(name, **overrides), partial)
  # wrong name: an AugViT file loaded as a DeiT lists the augmented-shortcut keys, nothing is loaded
  aname, aover, astate = golden_case("augvit_linear")
  path = tmp_path / "aug.safetensors"
  write_state_dict(str(path), astate, {"model_name": aname})
  with pytest.raises(StateDictMismatch) as err:
    load_torch(str(path), name, overrides)
  assert "blocks.0.augs_attn.weight" in str(err.value) and "unexpected keys" in str(err.value)


def test_cli_round_trip_through_trainer_checkpoint(tmp_path):
  """from-torch writes a trainer checkpoint; load_model reads it; to-torch exports the same tensors."""
  from vit_jax_fix import convert
  from vit_jax_fix.train.checkpoint import load_model
  name, overrides, state = golden_case("cait")
  src = tmp_path / "cait.pth"
  torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in state.items()}}, str(src))
  args = ["from-torch", "--name", name, "--weights", str(src), "--out", str(tmp_path / "run")]
  for k, v in overrides.items():
    args += ["--override", f"{k}={json.dumps(v)}"]
  assert convert.main(args) == 0
  model = load_model(str(tmp_path / "run"), name=name)
  assert_same_state(to_torch_state_dict(model), state)
  out = tmp_path / "back.safetensors"
  assert convert.main(["to-torch", "--checkpoint", str(tmp_path / "run"), "--out", str(out),
                       "--layout", "official"]) == 0
  sd, info = read_state_dict(str(out))
  assert_same_state(sd, state)
  assert info["metadata"]["model_name"] == name and info["metadata"]["weights"] == "raw"
  # a wrong name is reported (its message alone, exit 1), not half-loaded
  with pytest.raises(SystemExit) as e:
    convert.main(["from-torch", "--name", "deit_small_patch16_224", "--weights", str(src),
                  "--out", str(tmp_path / "bad")])
  assert e.value.code == 1 and not (tmp_path / "bad" / "checkpoints").exists()

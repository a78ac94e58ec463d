"""`python -m vit_jax_fix.evaluate`: the trainer's evaluation without training.

* A demo workdir (a short run on the embedded MNIST-5k) evaluates to exactly the top-1 / top-5 / loss its run
  logged in metrics.jsonl, raw and EMA; the same weights exported with `convert to-torch` (--weights), served
  by a local HTTP server as the model's released file (--pretrained), or imported back with `convert from-torch
  --name` without --weights, evaluate to the same numbers.
* ImageNet-ReaL and ImageNet-V2 on mocked tfds data: each evaluator reads its own dataset, split and labels
  (checked against the model's logits on the same batches), and the ReaL metric equals a hand-computed value
  on a six-image set whose label sets are built from the model's own ranking (two hits, two misses, two empty
  sets left out).
* EViT: another keep rate from the same weights (override and --keep_rates sweep).
* Mistakes a user can fix end with one message and exit code 2 (usage/config) or 1.
"""
import contextlib
import functools
import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest
from absl import flags

from tests.test_pretrained import _patch_row, _Server
from vit_jax_fix import convert, errors
from vit_jax_fix import evaluate as E
from vit_jax_fix.interop import save_torch
from vit_jax_fix.interop import testing as itesting
from vit_jax_fix.train import cli, loop
from vit_jax_fix.train import metrics as M

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = "deit_small_patch16_224"      # configs/deit_s.py's model
TINY = dict(img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=2)


def demo_argv(data_dir) -> list[str]:
  """configs/deit_s.py:demo at a tiny size: 30 steps of batch 32, one evaluation at the end (500 images)."""
  return ["--config", f"{ROOT / 'configs' / 'deit_s.py'}:demo", f"--config.data.data_dir={data_dir}",
          *(f"--config.model.overrides.{k}={v}" for k, v in TINY.items() if k not in ("img_size", "patch_size")),
          "--config.total_steps=30", "--config.batch_size=32", "--config.eval_batch_size=128",
          "--config.optimizer.lr=3e-3", "--config.schedule.warmup_steps=0", "--config.ema.decay=0.9",
          "--config.progress_bar=False"]


def parse(argv):
  """evaluate's own flag parsing (define_flags + cli.parse_flags) on fresh flag values."""
  fv = flags.FlagValues()
  E.define_flags(fv, sys_argv=["evaluate", *argv])
  return fv, cli.parse_flags(["evaluate", *argv], fv)


def evaluate_cli(argv):
  """What `python -m vit_jax_fix.evaluate ARGV` does (cli.run), in this process."""
  @errors.exit_on_user_error(prog="evaluate")
  def go():
    fv, rest = parse(argv)
    E.main(rest, fv)
  go()


def same(result: dict, row: dict, prefix: str):
  """The evaluator's numbers are the trainer's, bit for bit."""
  assert (result["top1"], result["top5"], result["loss"], result["num_examples"]) == \
      (row[f"{prefix}/top1"], row[f"{prefix}/top5"], row[f"{prefix}/loss"], row[f"{prefix}/count"])
  assert result["images_per_sec"] > 0


@pytest.fixture(scope="module")
def demo_run(demo_data_dir, tmp_path_factory):
  """(argv, config, workdir, the run's final eval row of metrics.jsonl)."""
  argv = demo_argv(demo_data_dir)
  config = parse(argv)[0].config
  workdir = str(tmp_path_factory.mktemp("evaluate") / "demo")
  loop.train_and_evaluate(config, workdir)
  row = [r for r in M.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/top1" in r][-1]
  assert row["step"] == 30 and row["eval/count"] == 500
  assert row["eval/top1"] > 0.12          # learnt something: the number is the model's, not chance's (0.1)
  return argv, config, workdir, row


# ------------------------------------------------------------------------------------- demo workdir

def test_checkpoint_evaluates_to_the_trainers_final_metrics(demo_run, tmp_path, capsys):
  argv, _, workdir, row = demo_run
  out = tmp_path / "raw.json"
  evaluate_cli(argv + ["--checkpoint", workdir, "--out", str(out)])
  result = json.loads(out.read_text())
  assert list(result) == ["val"] and set(result["val"]) == {"top1", "top5", "loss", "num_examples",
                                                           "images_per_sec"}
  same(result["val"], row, "eval")
  printed = capsys.readouterr().out
  assert f"val: top-1 {row['eval/top1']:.4f}" in printed and "(500 images," in printed
  # EMA weights, from the step directory itself.
  evaluate_cli(argv + ["--checkpoint", os.path.join(workdir, "checkpoints", "30"), "--ema", "--out", str(out)])
  same(json.loads(out.read_text())["val"], row, "eval_ema")


def test_exported_weights_evaluate_to_the_same_metrics(demo_run, tmp_path):
  """--weights: the run's EMA weights exported by `convert to-torch --ema` (timm layout, detected)."""
  _, config, workdir, row = demo_run
  path = str(tmp_path / "ema.safetensors")
  assert convert.main(["to-torch", "--checkpoint", workdir, "--out", path, "--ema"]) == 0
  same(E.run(config, weights=path)["val"], row, "eval_ema")


def test_pretrained_by_name_from_a_local_server(demo_run, tmp_path, monkeypatch):
  """--pretrained and `convert from-torch --name` without --weights: the registry's row of the config's model
  points at a local server holding the run's weights; downloaded once, then read from the cache; the
  imported checkpoint holds the run's parameters."""
  from vit_jax_fix.interop import weights as W
  from vit_jax_fix.train.checkpoint import load_state_dicts
  _, config, workdir, row = demo_run
  monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.delenv(W.MIRROR_ENV, raising=False)
  path = tmp_path / "demo.pth"
  assert convert.main(["to-torch", "--checkpoint", workdir, "--out", str(path), "--layout", "official"]) == 0
  server = _Server()
  try:
    server.files["/w/demo.pth"] = path.read_bytes()
    _patch_row(monkeypatch, NAME, url=f"{server.url}/w/demo.pth", file_name="demo.pth", layout="official")
    same(E.run(config, pretrained=True)["val"], row, "eval")
    imported = tmp_path / "imported"
    assert convert.main(["from-torch", "--name", NAME, "--out", str(imported),
                         *(a for k, v in TINY.items() for a in ("--override", f"{k}={v}"))]) == 0
    assert server.count("/w/demo.pth") == 1                   # the second use came from the cache
  finally:
    server.httpd.shutdown()
    server.httpd.server_close()
  got, want = load_state_dicts(str(imported))[2], load_state_dicts(workdir)[2]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_convert_from_torch_needs_weights_or_a_name_with_weights(capsys):
  with pytest.raises(SystemExit) as e:
    convert.main(["from-torch", "--out", "x"])
  assert e.value.code == 2 and "needs --weights FILE, or --name NAME" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    convert.main(["from-torch", "--name", "augvit_small", "--out", "x"])
  assert e.value.code == 2 and "augvit_small: its authors released no weights" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- EViT

def _random_weights_argv(tmp_path, demo_data_dir, config_file: str, name: str, arch: dict, *extra: str):
  """A random model of `arch` saved as safetensors, and evaluate's argv for the demo form of `config_file` at that
  architecture on 128 demo test images."""
  weights = str(tmp_path / f"{name}.safetensors")
  save_torch(itesting.random_model(name, **arch), weights, name=name, overrides=arch)
  return weights, ["--config", f"{ROOT / 'configs' / config_file}:demo", f"--config.data.data_dir={demo_data_dir}",
                   "--config.data.eval_split=test[:128]", "--config.eval_batch_size=128",
                   f"--config.model.overrides.embed_dim={arch['embed_dim']}",
                   f"--config.model.overrides.depth={arch['depth']}",
                   f"--config.model.overrides.num_heads={arch['num_heads']}", *extra]


def test_evit_other_keep_rates_from_one_set_of_weights(demo_data_dir, tmp_path):
  """configs/evit_s.py:demo (keep rate 0.7 in blocks 1, 2) with random weights: the sweep over 0.5 and 1 (the
  blocks stacked differently: one scan segment at 1) gives two different results, and its 0.5 entry is,
  bit for bit, what `--config.model.overrides.keep_rate=0.5` gives."""
  name = "deit_small_patch16_shrink_base"
  arch = dict(TINY, depth=3, keep_rate=0.7, keep_rate_blocks=(1, 2), fuse_token=True, num_classes=10)
  weights, argv = _random_weights_argv(tmp_path, demo_data_dir, "evit_s.py", name, arch,
                                       "--config.model.overrides.keep_rate_blocks=(1,2)")
  argv += ["--weights", weights]
  out = tmp_path / "sweep.json"
  evaluate_cli(argv + ["--keep_rates=0.5,1.0", "--out", str(out)])
  sweep = json.loads(out.read_text())["keep_rates"]
  assert list(sweep) == ["0.5", "1"] and all(v["val"]["num_examples"] == 128 for v in sweep.values())
  assert sweep["0.5"]["val"]["loss"] != sweep["1"]["val"]["loss"]
  assert all(v["val"]["images_per_sec"] > 0 for v in sweep.values())
  at_05 = E.run(parse(argv + ["--config.model.overrides.keep_rate=0.5"])[0].config, weights=weights)["val"]
  assert {k: sweep["0.5"]["val"][k] for k in ("top1", "top5", "loss")} == \
      {k: at_05[k] for k in ("top1", "top5", "loss")}


# -------------------------------------------------------------------------------------------- DeepViT

def test_deepvit_batch_norm_recalibrated_before_evaluating(demo_data_dir, tmp_path):
  """configs/deepvit_24b.py:demo (re-attention BatchNorm) with random weights: with bn_recalibration on, the
  statistics are re-estimated on train images first (other numbers than the file's statistics give)."""
  name = "deepvit_patch16_224_re_attn_24b"
  arch = dict(TINY, depth=2, reattention=True, num_classes=10)
  weights, argv = _random_weights_argv(tmp_path, demo_data_dir, "deepvit_24b.py", name, arch,
                                       "--config.bn_recalibration.num_batches=1",
                                       "--config.bn_recalibration.batch_size=64")
  config = parse(argv)[0].config
  assert config.bn_recalibration.enabled
  recalibrated = E.run(config, weights=weights)["val"]
  config.bn_recalibration.enabled = False
  as_stored = E.run(config, weights=weights)["val"]
  assert recalibrated["loss"] != as_stored["loss"]


# ------------------------------------------------------------------------------ ReaL and V2 (mocked tfds)

IMAGENET = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
SPLITS = {"imagenet2012": {"train": 16, "validation": 16}, "imagenet2012_real": {"validation": 12},
          "imagenet_v2": {"test": 10}}


def _write_metadata(data_dir: str, name: str, splits: dict):
  """dataset_info.json with these split sizes (the tfds offline recipe; no files, mock_data serves examples)."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
      for s, n in splits.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  """(config, weights file, model): a 1000-class tiny DeiT on mocked imagenet2012 with ReaL and V2 beside it."""
  from vit_jax_fix.train import config as C
  d = tmp_path_factory.mktemp("imagenet")
  for name, splits in SPLITS.items():
    _write_metadata(str(d / "tfds"), name, splits)
  model = itesting.random_model(NAME, **IMAGENET, num_classes=1000, scale=1.0)
  weights = str(d / "tiny.safetensors")
  save_torch(model, weights, name=NAME, overrides=dict(IMAGENET, num_classes=1000))
  c = C.base_config()
  c.model.overrides = dict(IMAGENET)
  c.data.dataset, c.data.data_dir, c.data.image_size = "imagenet2012", str(d / "tfds"), 16
  c.batch_size = c.eval_batch_size = 8
  return c, weights, model


@contextlib.contextmanager
def mocked_tfds(data_dir, as_dataset_fn=None):
  """tfds.testing.mock_data over the metadata in data_dir (random examples, or `as_dataset_fn`'s)."""
  import tensorflow_datasets as tfds

  from vit_jax_fix.data import testing as data_testing
  with mock.patch("tensorflow_datasets.testing.test_utils.MockFs", data_testing._NoMockFs), \
      tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir,
                             as_dataset_fn=as_dataset_fn):
    yield


def _batches_and_logits(setup, evaluator, model):
  """The evaluator's host batches (through the trainer's Setup) and the model's logits on them."""
  from vit_jax_fix.train import evaluate as eval_lib
  batches = list(setup.eval_batches(eval_lib.eval_data_config(setup.config.data, evaluator)))
  return [(b, itesting.logits(model, b["image"]).astype(np.float64)) for b in batches]


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_real_and_v2_read_their_own_datasets(imagenet):
  """val / real / v2 each read their dataset, split and label feature (their own example counts), and their
  numbers are the model's logits on those batches scored example by example."""
  config, weights, model = imagenet
  config = E.eval_config(config)
  config.evals = ("val", "real", "v2")
  with mocked_tfds(config.data.data_dir):
    results = E.run(config, weights=weights)
    setup = loop.Setup(config)
    for evaluator, n in (("val", 16), ("real", 12), ("v2", 10)):
      hits1 = hits5 = loss = count = 0.0
      for batch, logits in _batches_and_logits(setup, evaluator, model):
        for z, label, valid in zip(logits, batch["label"], batch["mask"]):
          labels = set(np.flatnonzero(label)) if evaluator == "real" else {int(label)}
          if not valid or not labels:
            continue
          order = np.argsort(-z)
          hits1 += order[0] in labels
          hits5 += bool(labels & set(order[:5]))
          loss -= np.mean(_log_softmax(z)[sorted(labels)])
          count += 1
      r = results[evaluator]
      assert r["num_examples"] == count == n, evaluator
      assert (r["top1"], r["top5"]) == (hits1 / n, hits5 / n), evaluator
      np.testing.assert_allclose(r["loss"], loss / n, rtol=1e-5, err_msg=evaluator)
  assert results["real"]["num_examples"] == 12        # mock_data's label sets are never empty


def test_real_top1_against_a_hand_computed_value(imagenet):
  """Six images; their ReaL label sets are written after ranking the model's logits on them:
  0 {best} hit; 1 {4th best} top-1 miss, top-5 hit; 2 {} left out; 3 {a class outside the top 5, best} hit;
  4 {} left out; 5 {a class outside the top 5} miss. ReaL top-1 = 2/4, top-5 = 3/4, over 4 images."""
  import tensorflow as tf
  config, weights, model = imagenet
  config = E.eval_config(config)
  config.evals = ("real",)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(6)]
  label_sets = [[] for _ in images]

  def as_dataset(builder, split, decoders=None, read_config=None, shuffle_files=False):
    features = builder.info.features
    assert builder.name == "imagenet2012_real", builder.name      # the only dataset this evaluation reads

    def examples():
      for i, image in enumerate(images):
        yield features.encode_example({"image": image, "original_label": 0, "real_label": label_sets[i],
                                       "file_name": f"ILSVRC2012_val_{i + 1:08d}.JPEG"})
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), features.get_serialized_info())
    ds = tf.data.Dataset.from_generator(examples, output_signature=spec)
    return ds.map(functools.partial(features.decode_example, decoders=decoders))

  _write_metadata(config.data.data_dir, "imagenet2012_real", {"validation": 6})
  try:
    with mocked_tfds(config.data.data_dir, as_dataset):
      setup = loop.Setup(config)
      logits = np.concatenate([z for _, z in _batches_and_logits(setup, "real", model)])[:6]
      order = np.argsort(-logits, axis=-1)
      outside = [int(o[-1]) for o in order]                         # the worst class: never in the top 5
      label_sets[:] = [[order[0][0]], [order[1][3]], [], [outside[3], order[3][0]], [], [outside[5]]]
      got = E.run(config, weights=weights)["real"]
  finally:
    _write_metadata(config.data.data_dir, "imagenet2012_real", SPLITS["imagenet2012_real"])
  logp = _log_softmax(logits)
  loss = np.mean([-np.mean(logp[i][label_sets[i]]) for i in (0, 1, 3, 5)])
  assert (got["top1"], got["top5"], got["num_examples"]) == (0.5, 0.75, 4)
  np.testing.assert_allclose(got["loss"], loss, rtol=1e-5)


# ------------------------------------------------------------------------------------------ user errors

@pytest.mark.parametrize("extra, code, message", [
    ([], 2, "give exactly one of --checkpoint WORKDIR[/checkpoints/STEP], --weights FILE or --pretrained "
            "(none was given)"),
    (["--checkpoint", "W", "--pretrained"], 2, "(got --checkpoint and --pretrained)"),
    (["--checkpoint", "/no/such/workdir"], 1, "no checkpoint found at '/no/such/workdir'"),
    (["--weights", "/no/such/file.pth"], 1, "--weights '/no/such/file.pth': no such file"),
    # With a weights file that is not there: these are found before any weights are read.
    (["--weights", "no.pth", "--keep_rates=0.5,x"], 2, "--keep_rates=0.5,x: give numbers in (0, 1]"),
    (["--weights", "no.pth", "--config.evals=val,v2/top-images"], 2, "unknown evaluator 'v2/top-images'"),
    (["--weights", "no.pth", "--config.evals=val,real"], 1, "tfds dataset 'imagenet2012_real' is not prepared"),
])
def test_user_errors_end_with_one_message(extra, code, message, demo_data_dir, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate_cli(demo_argv(demo_data_dir) + extra)
  err = capsys.readouterr().err
  assert e.value.code == code and err.startswith("evaluate: error: ") and message in err, err
  assert "Traceback" not in err


def test_keep_rates_need_a_model_with_a_keep_rate(demo_data_dir, capsys):
  with pytest.raises(SystemExit) as e:
    evaluate_cli(["--config", f"{ROOT / 'configs' / 'shunted_t.py'}:demo", f"--config.data.data_dir={demo_data_dir}",
                  "--weights", "no.pth", "--keep_rates=0.5"])
  assert e.value.code == 2 and "shunted_t has no EViT keep rate" in capsys.readouterr().err


def _run_module(argv, **env):
  environ = {k: v for k, v in os.environ.items() if k != errors.DEBUG_ENV}
  environ.update(VIT_JAX_FIX_HUGEPAGES="0", TF_CPP_MIN_LOG_LEVEL="3", JAX_NUM_CPU_DEVICES="8", **env)
  return subprocess.run([sys.executable, "-m", "vit_jax_fix.evaluate", *argv], cwd=ROOT, env=environ,
                        capture_output=True, text=True, timeout=300)


def test_command_line_usage_error_exit_code(demo_data_dir):
  out = _run_module(demo_argv(demo_data_dir) + ["--weights", "a.pth", "--pretrained"])
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1] == (
      "python -m vit_jax_fix.evaluate: error: give exactly one of --checkpoint WORKDIR[/checkpoints/STEP], "
      "--weights FILE or --pretrained (got --weights and --pretrained).")


@pytest.mark.slow
def test_command_line_run(demo_run, tmp_path):
  """The real `python -m vit_jax_fix.evaluate` on the demo workdir: console lines and the JSON."""
  argv, _, workdir, row = demo_run
  out = tmp_path / "r.json"
  proc = _run_module(argv + ["--checkpoint", workdir, "--ema", "--out", str(out)])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"val: top-1 {row['eval_ema/top1']:.4f}" in proc.stdout and f"wrote {out}" in proc.stdout
  same(json.loads(out.read_text())["val"], row, "eval_ema")

"""Writes the notebooks of this folder (outputs stripped):  python notebooks/build_notebooks.py

The notebooks are generated so that their shared parts (parameters, install cell) stay identical and so that a
review sees plain Python. Edit this file, run it, and commit both the script and the .ipynb files;
`tests/test_notebooks.py` checks that they are in sync and executes every notebook in its small mode.

Every notebook only calls library functions (vit_jax_fix.*, configs/*.py); nothing the library does is
re-implemented here, so the notebooks follow the code when it changes.
"""
from __future__ import annotations

import pathlib
import sys
import textwrap

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
REPO_URL = "https://github.com/vit-jax-fix/vit_jax_fix"
COLAB = "https://colab.research.google.com/github/vit-jax-fix/vit_jax_fix/blob/main/notebooks/{name}.ipynb"
BADGE = "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def md(text: str):
  return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, *tags: str):
  cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip())
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def parameters(extra: str) -> object:
  """The first code cell (papermill 'parameters' tag): the small mode switch, the repository, and the
  notebook's own parameters."""
  common = textwrap.dedent(f'''
      # Parameters: edit here (or inject them with papermill; this cell is tagged "parameters").
      import os
      import tempfile

      # Small mode (CI, or a quick look on a laptop): tiny models, a few training steps on the embedded
      # MNIST-5k digits, nothing downloaded. Selected by the environment variable VIT_JAX_FIX_NOTEBOOK_SMALL=1.
      SMALL = os.environ.get("VIT_JAX_FIX_NOTEBOOK_SMALL", "0") == "1"
      # Where the install cell gets the library from. REPO_REF pins the code (a tag or a commit); the
      # library's setup.cfg pins jax/flax/optax/orbax (and torch/timm for the interop extras) to the tested
      # versions, so one ref gives one tested environment.
      REPO_URL = "{REPO_URL}"
      REPO_REF = "main"
      # Checkpoints, exported files and plots go under this folder (CI points it at a temporary directory).
      OUT_ROOT = os.environ.get("VIT_JAX_FIX_NOTEBOOK_WORKDIR") or os.path.join(tempfile.gettempdir(), "vit_jax_fix_notebooks")
  ''').strip()
  return code(common + "\n\n" + textwrap.dedent(extra).strip(), "parameters")


def install(extras: str, *, clone: bool) -> object:
  """Colab: installs the library (at REPO_REF) when it is not importable; elsewhere (CI, a local checkout
  installed with `pip install -e .[test]`) it only finds the repository. `clone` also fetches the repository
  itself (the training configs live in configs/, next to the package, not inside it)."""
  spec = f"vit_jax_fix[{extras}]" if extras else "vit_jax_fix"
  local = f"{{REPO_DIR}}[{extras}]" if extras else "{REPO_DIR}"
  if clone:
    body = f'''
      # Install (Colab). Skipped when vit_jax_fix is already importable (CI, a local `pip install -e ".[test]"`).
      import importlib.util
      import pathlib
      import shutil
      import subprocess
      import sys

      IN_COLAB = "google.colab" in sys.modules


      def find_repository():
          """The checkout holding configs/ (the training configs are not part of the installed package)."""
          for d in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]:
              if (d / "configs" / "common.py").is_file() and (d / "vit_jax_fix").is_dir():
                  return d
          return None


      REPO_DIR = find_repository()
      if REPO_DIR is None:  # Colab, or a notebook opened outside the repository: clone it at REPO_REF
          REPO_DIR = pathlib.Path("/content" if IN_COLAB else tempfile.gettempdir()) / "vit_jax_fix"
          if not REPO_DIR.exists():
              subprocess.run(["git", "clone", "-q", REPO_URL, str(REPO_DIR)], check=True)
              subprocess.run(["git", "-C", str(REPO_DIR), "checkout", "-q", REPO_REF], check=True)
      if importlib.util.find_spec("vit_jax_fix") is None:
          # setup.cfg declares version ranges: the runtime's own JAX (with its TPU/GPU plugin) and TensorFlow
          # stay when they are recent enough.
          from importlib.metadata import PackageNotFoundError, version

          def installed(package):
              try:
                  return version(package)
              except PackageNotFoundError:
                  return None

          jax_before = installed("jax")
          subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"{local}"], check=True)
          jax_version = installed("jax")
          if IN_COLAB and jax_version != jax_before:
              # pip had to upgrade an older runtime JAX (to a CPU build): add the accelerator plugin of the new
              # version for a TPU or GPU runtime (Runtime > Change runtime type).
              if os.path.exists("/dev/accel0") or os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE"):
                  subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"jax[tpu]=={{jax_version}}"], check=True)
              elif shutil.which("nvidia-smi"):
                  subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"jax[cuda12]=={{jax_version}}"], check=True)
          print("installed; if pip replaced a package this session had already imported, restart the session "
                "(Runtime > Restart session) and run all cells again: this cell then skips.")
      sys.path.insert(0, str(REPO_DIR))  # makes `configs` importable
      print("repository:", REPO_DIR)
    '''
  else:
    body = f'''
      # Install (Colab). Skipped when vit_jax_fix is already importable (CI, a local `pip install -e ".[test]"`).
      import importlib.util
      import subprocess
      import sys

      IN_COLAB = "google.colab" in sys.modules
      if importlib.util.find_spec("vit_jax_fix") is None:
          # setup.cfg declares version ranges: the runtime's JAX, TensorFlow and torch stay when recent enough.
          subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                          f"{spec} @ git+{{REPO_URL}}@{{REPO_REF}}"], check=True)
          print("installed; if pip replaced a package this session had already imported, restart the session "
                "(Runtime > Restart session) and run all cells again: this cell then skips.")
      else:
          print("vit_jax_fix is already installed")
    '''
  return code(body)


# --------------------------------------------------------------------------------------------- quickstart

def quickstart():
  return [
      md(f"""
      # vit_jax_fix quickstart

      {BADGE.format(url=COLAB.format(name='quickstart'))}

      1. install the library from the repository (pinned versions),
      2. create a model of the zoo (DeiT, DeiT III, CaiT, AugViT, DeepViT, AttnScale/FeatScale, EViT, Shunted),
      3. load weights converted from PyTorch and check that JAX and PyTorch agree,
      4. classify images (photos from scikit-learn, digits from the embedded demo set),
      5. look at attention maps and at the collapse diagnostics (feature diversity, token similarity,
         cross-layer attention similarity, high-frequency content, per block).

      In Colab (full mode) it converts timm's ImageNet-pretrained `deit_small_patch16_224` (downloaded by timm);
      set `TORCH_WEIGHTS` to convert your own `.pth` / `.safetensors` instead. In small mode
      (`VIT_JAX_FIX_NOTEBOOK_SMALL=1`, used by CI) the PyTorch model is a tiny, randomly initialised timm twin
      and nothing is downloaded, so the predictions are arbitrary; the point there is that both frameworks
      agree.
      """),
      parameters('''
          # Any registered model that timm also has (DeiT, DeiT III, CaiT without extra fixes); see list_models().
          MODEL_NAME = "deit_small_patch16_224"
          # A PyTorch checkpoint of MODEL_NAME (timm or official layout, .pth/.pt/.bin/.safetensors). Empty: timm's
          # pretrained weights (full mode, downloads) or a random timm twin (small mode).
          TORCH_WEIGHTS = ""
          # Small mode shrinks the model: 28 px digits, 7 px patches (a 4 x 4 grid), 4 blocks of width 64.
          OVERRIDES = dict(img_size=28, patch_size=7, embed_dim=64, depth=4, num_heads=4, num_classes=10) if SMALL else {}
          OUT_DIR = os.path.join(OUT_ROOT, "quickstart")
          os.makedirs(OUT_DIR, exist_ok=True)
      '''),
      install("interop-timm", clone=False),
      md("""
      ## The model zoo

      `create_model(name, **overrides)` builds any registered model with its official defaults; every fix is a
      keyword (`aug_shortcut=`, `feat_scale=`, `attn_scale=`, `reattention=`, `layer_scale=`, `keep_rate=`...).
      `model_defaults(name)` gives the preprocessing of its family.
      """),
      code('''
          import jax
          import jax.numpy as jnp
          import matplotlib.pyplot as plt
          import io

          import numpy as np
          from IPython.display import Image, display

          import vit_jax_fix
          from vit_jax_fix import create_model, diagnostics, list_models, model_defaults
          from vit_jax_fix.models.registry import count_params


          def show(fig):
              """Displays a figure as PNG: a pyplot figure or a bare matplotlib Figure (what the diagnostics plots draw)."""
              buf = io.BytesIO()
              fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
              plt.close(fig)
              display(Image(data=buf.getvalue()))


          print("JAX", jax.__version__, "devices:", jax.devices())
          print(len(list_models()), "registered models:", ", ".join(list_models()))
          print(MODEL_NAME, "preprocessing:", model_defaults(MODEL_NAME))
      '''),
      code('''
          # The same size as MODEL_NAME, with AugViT's augmented shortcuts (random initialisation).
          augvit = create_model("augvit_small", **OVERRIDES)
          print(f"augvit_small: {count_params(augvit) / 1e6:.2f} M parameters, depth {augvit.depth}")
      '''),
      md("""
      ## Weights converted from PyTorch

      `vit_jax_fix.interop.load_torch(path, name, overrides)` reads a PyTorch state dict (timm or official key
      layout, detected), converts every tensor to the Flax layout and fails loudly, listing the keys, when
      anything does not fit. `save_torch` / `to_torch_state_dict` go the other way (see the convert notebook).
      """),
      code('''
          import torch

          from vit_jax_fix.interop import load_torch, timm_config
          from vit_jax_fix.interop.timm_models import create_timm_model
          from vit_jax_fix.interop.torch_compat import import_timm

          timm = import_timm()
          torch_model = None
          if TORCH_WEIGHTS:
              weights_path = TORCH_WEIGHTS
          elif SMALL:
              # No downloads in small mode: a randomly initialised timm twin stands in for a pretrained model.
              torch_model = create_timm_model(MODEL_NAME, **OVERRIDES)
              weights_path = os.path.join(OUT_DIR, "timm_twin.pth")
              torch.save(torch_model.state_dict(), weights_path)
          else:
              timm_name, timm_kwargs = timm_config(MODEL_NAME, **OVERRIDES)
              torch_model = timm.create_model(timm_name, pretrained=True, **timm_kwargs)  # ImageNet weights
              weights_path = os.path.join(OUT_DIR, f"{timm_name}.pth")
              torch.save(torch_model.state_dict(), weights_path)

          model, info = load_torch(weights_path, MODEL_NAME, OVERRIDES or None)
          model.eval()
          if torch_model is None:  # your own file: its timm twin, loaded by timm from the same file
              torch_model = create_timm_model(MODEL_NAME, pretrained_file=weights_path, **info["overrides"])
          torch_model.eval()
          print(f"loaded {weights_path} ({info['layout']} layout) into {MODEL_NAME} {info['overrides']}: "
                f"{count_params(model) / 1e6:.2f} M parameters")
      '''),
      md("""
      ## Classify images

      Photos from scikit-learn (shipped with it) and digits from the embedded demo set, preprocessed by the
      input pipeline's own eval transform (resize, centre crop, normalise with the model's defaults).
      """),
      code('''
          import PIL.Image
          from sklearn.datasets import load_sample_images

          from vit_jax_fix import data as vdata
          from vit_jax_fix.data import transforms as T

          pre = model_defaults(MODEL_NAME)
          size = model.img_size[0]


          def preprocess(rgb):
              """uint8 (H, W, 3) -> the eval input of the model (what build_eval_iterator does to every image)."""
              buf = io.BytesIO()
              PIL.Image.fromarray(rgb).save(buf, "PNG")
              img = T.eval_resize_crop(buf.getvalue(), size, pre["crop_pct"], pre["interpolation"])
              return np.asarray(T.normalize(img, pre["mean"], pre["std"]))


          photos = np.stack([preprocess(x) for x in load_sample_images().images])
          data_cfg = vdata.default_data_config()
          data_cfg.dataset, data_cfg.image_size = "demo", size
          digits = next(vdata.build_eval_iterator(data_cfg, global_batch_size=6, model_defaults=pre))
          images = np.concatenate([photos, digits["image"]]).astype(np.float32)
          truth = ["photo", "photo"] + [f"digit {int(y)}" for y in digits["label"]]
          print(images.shape)
      '''),
      code('''
          with jax.default_matmul_precision("highest"):  # fp32 matmuls also on TPU, for the comparison
              logits, inter = model(jnp.asarray(images), return_intermediates=True)
          logits = np.asarray(logits)
          with torch.no_grad():
              torch_logits = torch_model(torch.tensor(images).permute(0, 3, 1, 2)).numpy()

          print(f"max |JAX - PyTorch| logit difference: {np.abs(logits - torch_logits).max():.2e}")
          assert np.array_equal(logits.argmax(-1), torch_logits.argmax(-1)), "JAX and PyTorch disagree"

          if model.num_classes == 1000:
              imagenet = timm.data.ImageNetInfo()
              class_name = lambda i: imagenet.index_to_description(int(i)).split(",")[0]
          else:
              class_name = str
          probs = jax.nn.softmax(logits, -1)
          fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.8))
          for ax, img, p, t, tp in zip(axes, images, probs, truth, torch_logits):
              shown = np.clip(img * np.array(pre["std"]) + np.array(pre["mean"]), 0, 1)
              ax.imshow(shown)
              ax.set_title(f"{t}\\nJAX: {class_name(p.argmax())} ({p.max():.2f})\\ntorch: {class_name(tp.argmax())}",
                           fontsize=7)
              ax.axis("off")
          show(fig)
      '''),
      md("""
      ## Attention maps

      `model(images, return_intermediates=True)` also returns every block's tokens and post-softmax attention
      maps (`inter['attn'][i]`: batch x heads x tokens x tokens). The class token's attention to the patches,
      averaged over heads and reshaped to the patch grid, shows where the model looks.
      """),
      code('''
          grid = model.grid_size
          prefix = model.num_prefix_tokens


          def cls_attention(block):
              a = np.asarray(inter["attn"][block])  # (B, heads, N, N)
              return a[:, :, 0, prefix:].mean(1).reshape(-1, *grid)


          last = cls_attention(-1)
          fig, axes = plt.subplots(2, len(images), figsize=(2.2 * len(images), 4.6))
          for i, img in enumerate(images):
              shown = np.clip(img * np.array(pre["std"]) + np.array(pre["mean"]), 0, 1)
              axes[0, i].imshow(shown)
              axes[0, i].imshow(last[i], cmap="inferno", alpha=0.6, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                             interpolation="nearest")
              axes[0, i].set_title(truth[i], fontsize=8)
              axes[1, i].imshow(last[i], cmap="inferno")
              for ax in axes[:, i]:
                  ax.axis("off")
          fig.suptitle("class-token attention of the last block (mean over heads)")
          show(fig)

          # The same map through depth, for the first photo: attention maps of deep ViTs become alike.
          depth = len(inter["attn"])
          fig, axes = plt.subplots(1, depth, figsize=(1.6 * depth, 1.9), squeeze=False)
          for b, ax in enumerate(axes[0]):
              ax.imshow(cls_attention(b)[0], cmap="inferno")
              ax.set_title(f"block {b}", fontsize=8)
              ax.axis("off")
          show(fig)
      '''),
      md("""
      ## Collapse diagnostics

      `vit_jax_fix.diagnostics` measures, per block, how much the tokens still differ from each other
      (feature diversity, token similarity), how similar consecutive attention maps are, and how much
      high-frequency content the tokens keep, on the same images for every model. `plot_all` draws them.
      The same measures are available from the command line (`python -m vit_jax_fix.diagnose`) and as a
      TensorBoard hook for training.
      """),
      code('''

          results = diagnostics.diagnose(
              {f"{MODEL_NAME} (converted)": model, "augvit_small (random init)": augvit},
              data="demo", batch_size=32 if SMALL else 64, num_batches=1 if SMALL else 4, progress=False)
          for label, res in results.items():
              print(f"{label}: feature diversity per block {np.round(res['feature_diversity'], 3).tolist()}, "
                    f"similar blocks {res['similar_blocks']}")
          for path in diagnostics.plot_all(results, os.path.join(OUT_DIR, "diagnostics")).values():
              display(Image(filename=str(path)))
      '''),
      md("""
      Next: `train_colab.ipynb` trains a model with the same trainer as `main.py`, and
      `convert_to_pytorch.ipynb` exports a trained checkpoint to PyTorch and checks it in timm.
      """),
  ]


# --------------------------------------------------------------------------------------------- train

def train_colab():
  return [
      md(f"""
      # Train on a Colab TPU or GPU runtime

      {BADGE.format(url=COLAB.format(name='train_colab'))}

      Runs a config of `configs/` through the same library calls as `main.py`
      (`sharding.maybe_initialize_distributed()`, then `train_and_evaluate(config, workdir)`), on every device
      of the runtime, with checkpoints, metrics and TensorBoard in the workdir.

      * Pick the runtime first: Runtime > Change runtime type > TPU (or a GPU). The install cell keeps the
        runtime's JAX when it is recent enough (else it adds the matching plugin). On TPU and GPU the model
        computes in bfloat16 with float32 parameters (`config.model.overrides.dtype = "bfloat16"`).
      * Keep the workdir on Google Drive (`USE_DRIVE`): after a runtime restart or disconnect, run all cells
        again and training resumes from the last checkpoint (parameters, optimizer, EMA, data position).
      * The `demo` argument of every config trains a small model of the same family on the embedded MNIST-5k
        digits (no dataset download). Drop it and set `config.data.*` for ImageNet.

      Small mode (`VIT_JAX_FIX_NOTEBOOK_SMALL=1`, CI): a tiny model, a few steps, on CPU.
      """),
      parameters('''
          CONFIG = "deit_s"      # any configs/<name>.py, e.g. augvit_s, deit3_s, cait_xxs24, featscale_s12, evit_s
          CONFIG_ARG = "demo"    # "demo": the embedded MNIST-5k; "": the paper recipe on ImageNet (prepare it first)
          STEPS = 6 if SMALL else 300  # optimizer updates
          FSDP = 1               # devices that shard parameters (ZeRO-3 style); the rest is data parallel
          USE_DRIVE = True       # Colab: keep the workdir on Google Drive, so a restarted runtime resumes
      '''),
      install("", clone=True),
      md("""
      ## Devices and mesh

      `maybe_initialize_distributed()` is what `main.py` calls first (a no-op on one host); the mesh has a
      `data` and an `fsdp` axis over all devices.
      """),
      code('''
          from vit_jax_fix.train import sharding

          sharding.maybe_initialize_distributed()
          import jax

          print(f"backend {jax.default_backend()}: {jax.device_count()} devices, {jax.process_count()} process(es)")
          for d in jax.devices():
              print("  ", d)
          mesh = sharding.make_mesh(data=-1, fsdp=FSDP)
          print("mesh:", dict(mesh.shape))
      '''),
      md("""
      ## The config and the workdir

      The config is the one `python main.py --config configs/<CONFIG>.py:demo` reads; change any key before
      training (unknown keys are errors that name the nearest valid key).
      """),
      code('''
          import importlib

          config = importlib.import_module(f"configs.{CONFIG}").get_config(CONFIG_ARG)
          config.total_steps = STEPS
          config.mesh.fsdp = FSDP
          if config.batch_size % jax.device_count():
              raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.device_count()} devices")
          if jax.default_backend() in ("tpu", "gpu"):
              # Mixed precision: bf16 compute, fp32 parameters and optimizer state (norms and softmax in fp32).
              # The command-line form: --config.model.overrides.dtype=bfloat16
              config.model.overrides.dtype = "bfloat16"
          if SMALL:
              config.model.overrides.update(embed_dim=64, depth=2, num_heads=2)
              config.batch_size = 32
              config.schedule.warmup_steps = 2  # the demo's 2 warm-up epochs would outlast the few steps
              config.log_every_steps = 2
              config.checkpoint_every_steps = 2
              config.progress_bar = False

          if os.environ.get("VIT_JAX_FIX_NOTEBOOK_WORKDIR") or not IN_COLAB:
              WORKDIR = os.path.join(OUT_ROOT, f"train_{CONFIG}")
          elif USE_DRIVE:
              from google.colab import drive
              drive.mount("/content/drive")
              WORKDIR = f"/content/drive/MyDrive/vit_jax_fix/{CONFIG}_{CONFIG_ARG or 'paper'}"
          else:
              WORKDIR = f"/content/runs/{CONFIG}_{CONFIG_ARG or 'paper'}"
          print("workdir:", WORKDIR)
          print("model:", config.model.name, dict(config.model.overrides))
          print("batch", config.batch_size, "| steps", config.total_steps, "| optimizer", config.optimizer.name,
                config.optimizer.lr, "| data", config.data.dataset, config.data.image_size)
      '''),
      md("""
      ## TensorBoard

      The trainer writes TensorBoard events to `WORKDIR/tensorboard` (and every logged row to
      `WORKDIR/metrics.jsonl`). Start TensorBoard before training to watch the curves live; this cell does
      nothing when the `tensorboard` package is missing (`pip install tensorboard`), and in small mode.
      """),
      code('''
          from IPython import get_ipython

          if importlib.util.find_spec("tensorboard") is not None and not SMALL:
              get_ipython().run_line_magic("load_ext", "tensorboard")
              get_ipython().run_line_magic("tensorboard", f"--logdir {WORKDIR}/tensorboard")
          else:
              print("TensorBoard skipped; the metrics are plotted from metrics.jsonl below")
      '''),
      md("## Train"),
      code('''
          from vit_jax_fix.train import train_and_evaluate

          final = train_and_evaluate(config, WORKDIR, mesh=mesh)
          print({k: round(float(v), 4) for k, v in final.items()})
      '''),
      code('''
          import io

          import matplotlib.pyplot as plt
          from IPython.display import Image, display

          from vit_jax_fix.train.metrics import read_jsonl


          def show(fig):
              """Displays a figure as PNG, whatever the matplotlib backend."""
              buf = io.BytesIO()
              fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
              plt.close(fig)
              display(Image(data=buf.getvalue()))


          def plot_metrics():
              rows = read_jsonl(os.path.join(WORKDIR, "metrics.jsonl"))
              train = [r for r in rows if "train/loss" in r]
              evals = [r for r in rows if "eval/top1" in r]
              fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3))
              a.plot([r["step"] for r in train], [r["train/loss"] for r in train], marker=".")
              a.set(title="train loss", xlabel="step")
              for key in ("eval/top1", "eval_ema/top1"):
                  b.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], marker="o", label=key)
              b.set(title="eval top-1", xlabel="step")
              b.legend()
              show(fig)


          plot_metrics()
          print("checkpoints:", sorted(os.listdir(os.path.join(WORKDIR, "checkpoints"))))
      '''),
      md("""
      ## Resume after a restart

      Every call of `train_and_evaluate` on a workdir that holds checkpoints restores the latest one
      (parameters, optimizer state, EMA, RNG and data position) and trains on, so the interrupted run ends
      exactly where an uninterrupted one does. After a runtime restart or disconnect, that is all you do: run
      all cells again with the same workdir (on Drive). The workdir also remembers its config: resuming with
      a config that would train something else is refused (bookkeeping keys such as logging, the mesh or
      `debug_*` may change).

      The cells below show it on a second workdir. A watcher sends this process `SIGTERM` once the run has
      logged its first checkpoint step (what a TPU VM or a cluster does before it takes the machine away; the
      `debug_step_sleep` slows the steps so the signal lands mid-run): the trainer saves a checkpoint and
      returns. The second call resumes from it, and the result equals the uninterrupted run above.
      """),
      code('''
          import signal
          import threading
          import time


          def preempt_when_logged(workdir, at_step, timeout_s=600):
              """Sends this process SIGTERM once `workdir` has logged step `at_step` (a watcher thread)."""
              def watch():
                  path, start = os.path.join(workdir, "metrics.jsonl"), time.time()
                  while time.time() - start < timeout_s:
                      try:
                          if any(r["step"] >= at_step for r in read_jsonl(path)):
                              os.kill(os.getpid(), signal.SIGTERM)
                              return
                      except ValueError:  # a line being written
                          pass
                      time.sleep(0.05)
              threading.Thread(target=watch, daemon=True).start()


          RESTART_DIR = WORKDIR + "_restarted"
          config.debug_step_sleep = 1.0 if SMALL else 0.2
          # The trainer turns SIGTERM into "save and return" only while it runs in the main thread; outside its
          # loop this cell ignores SIGTERM, so a late signal cannot end the kernel.
          assert threading.current_thread() is threading.main_thread()
          previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
          try:
              preempt_when_logged(RESTART_DIR, at_step=config.log_every_steps)
              first = train_and_evaluate(config, RESTART_DIR, mesh=mesh)
          finally:
              signal.signal(signal.SIGTERM, previous)
          print("first call returned", first, "| checkpoints:", sorted(os.listdir(os.path.join(RESTART_DIR, "checkpoints"))))
          assert "preempted_at" in first, first
      '''),
      code('''
          # "Run all" after the restart: the same config (debug_* keys may differ) on the same workdir resumes.
          config.debug_step_sleep = 0.0
          resumed = train_and_evaluate(config, RESTART_DIR, mesh=mesh)
          steps = [r["step"] for r in read_jsonl(os.path.join(RESTART_DIR, "metrics.jsonl")) if "train/loss" in r]
          print("logged steps:", steps)
          print("uninterrupted:", {k: round(float(v), 4) for k, v in final.items()})
          print("resumed:      ", {k: round(float(v), 4) for k, v in resumed.items()})
          assert steps[-1] == STEPS and resumed == final, (steps, resumed, final)
      '''),
      code('''
          # Running it again on a finished workdir does not train again: it reports the stored final evaluation.
          again = train_and_evaluate(config, WORKDIR, mesh=mesh)
      '''),
      md("""
      ## Use the trained model

      `load_model(workdir)` returns the eval-mode model of the latest checkpoint. Export it to PyTorch with
      `convert_to_pytorch.ipynb` (set its `CHECKPOINT` to this `WORKDIR`) or
      `python -m vit_jax_fix.convert to-torch --checkpoint WORKDIR --out model.safetensors`.
      """),
      code('''
          import numpy as np

          from vit_jax_fix import data as vdata
          from vit_jax_fix.train import load_model

          model = load_model(WORKDIR)
          batch = next(vdata.build_eval_iterator(config.data, global_batch_size=10))
          print("labels:     ", batch["label"].tolist())
          print("predictions:", np.asarray(model(batch["image"])).argmax(-1).tolist())
      '''),
  ]


# --------------------------------------------------------------------------------------------- convert

def convert_to_pytorch():
  return [
      md(f"""
      # Export to PyTorch and check it in timm

      {BADGE.format(url=COLAB.format(name='convert_to_pytorch'))}

      1. train a small model here, or point `CHECKPOINT` at a trainer workdir (e.g. the one of
         `train_colab.ipynb`) or one of its step folders,
      2. export it with `vit_jax_fix.convert.export_checkpoint` to `.safetensors` in timm's key layout (the file
         carries the timm model name and constructor arguments in its metadata),
      3. load the file in timm exactly as a PyTorch user would, and compare logits and predictions side by
         side on demo images,
      4. export the official repository's layout (`.pth`) too and load it back.

      Small mode (`VIT_JAX_FIX_NOTEBOOK_SMALL=1`, CI): a tiny model trained for a few steps on CPU.
      """),
      parameters('''
          # A trainer checkpoint: a workdir (its latest step) or WORKDIR/checkpoints/<step>. Empty: train one here.
          CHECKPOINT = ""
          CONFIG = "deit_s"            # used only to train when CHECKPOINT is empty (timm has DeiT/DeiT III/CaiT)
          STEPS = 20 if SMALL else 300
          EMA = False                  # export the EMA weights instead of the raw ones
          NUM_IMAGES = 32 if SMALL else 500   # demo test images to compare on
          OUT_DIR = os.path.join(OUT_ROOT, "convert")
          os.makedirs(OUT_DIR, exist_ok=True)
      '''),
      install("interop-timm", clone=True),
      md("## Train (or load) a checkpoint"),
      code('''
          import importlib

          import jax
          import numpy as np

          from vit_jax_fix.train import load_model, train_and_evaluate

          config = None
          if not CHECKPOINT:
              config = importlib.import_module(f"configs.{CONFIG}").get_config("demo")
              config.total_steps = STEPS
              if SMALL:
                  config.model.overrides.update(embed_dim=64, depth=2, num_heads=2)
                  config.batch_size = 32
                  config.schedule.warmup_steps = 2  # the demo's 2 warm-up epochs would outlast the few steps
                  config.progress_bar = False
              CHECKPOINT = os.path.join(OUT_DIR, f"train_{CONFIG}")
              train_and_evaluate(config, CHECKPOINT)

          model = load_model(CHECKPOINT, ema=EMA)
          print(f"{model.spec_name}: image size {model.img_size}, {model.num_classes} classes")
      '''),
      md("""
      ## Export

      `export_checkpoint` picks timm's layout for models timm has (ViT / DeiT / DeiT III / CaiT without extra
      fixes) and the official repository's layout for the others; the CLI equivalent is
      `python -m vit_jax_fix.convert to-torch --checkpoint CHECKPOINT --out model.safetensors`.
      """),
      code('''
          from vit_jax_fix.convert import export_checkpoint

          timm_path = os.path.join(OUT_DIR, "model.safetensors")
          meta = export_checkpoint(CHECKPOINT, timm_path, ema=EMA)
          print(f"wrote {timm_path} ({os.path.getsize(timm_path) / 1e6:.1f} MB), {meta['layout']} layout")
          print("load with:", meta.get("timm_create", "(no timm twin: load it into the official model class)"))
      '''),
      md("""
      ## Load it in timm

      Only timm and the file: the model name and constructor arguments come from the file's metadata.
      """),
      code('''
          import torch

          from vit_jax_fix.interop import read_state_dict
          from vit_jax_fix.interop.torch_compat import import_timm

          timm = import_timm()  # timm, with the torchvision operator shim this CPU torch build needs
          _, info = read_state_dict(timm_path)
          file_meta = info["metadata"]
          torch_model = timm.create_model(
              file_meta["timm_model"], pretrained=True,
              pretrained_cfg_overlay=dict(file=timm_path, num_classes=file_meta["num_classes"]),
              **file_meta["timm_kwargs"]).eval()
          print(type(torch_model).__name__, file_meta["timm_model"], file_meta["timm_kwargs"])
      '''),
      md("## Compare predictions side by side"),
      code('''
          from vit_jax_fix import data as vdata
          from vit_jax_fix import model_defaults

          if config is not None:
              data_cfg = config.data
          else:  # a checkpoint from elsewhere: the demo digits with the demo configs' eval transform
              data_cfg = vdata.default_data_config()
              data_cfg.update(dataset="demo", crop_pct=1.0, interpolation="bilinear")
          data_cfg.image_size = model.img_size[0]
          batch = next(vdata.build_eval_iterator(data_cfg, global_batch_size=NUM_IMAGES,
                                                 model_defaults=model_defaults(model.spec_name)))
          images, labels = batch["image"], batch["label"]

          with jax.default_matmul_precision("highest"):
              jax_logits = np.asarray(model(images))
          with torch.no_grad():
              torch_logits = torch_model(torch.tensor(images).permute(0, 3, 1, 2)).numpy()

          jax_pred, torch_pred = jax_logits.argmax(-1), torch_logits.argmax(-1)
          print(f"{'label':>5} {'JAX':>4} {'timm':>4} {'JAX logit':>10} {'timm logit':>10}")
          for i in range(min(12, len(labels))):
              print(f"{labels[i]:5d} {jax_pred[i]:4d} {torch_pred[i]:4d} {jax_logits[i].max():10.5f} "
                    f"{torch_logits[i].max():10.5f}")
          diff = np.abs(jax_logits - torch_logits).max()
          print(f"top-1 on {len(labels)} demo images: JAX {np.mean(jax_pred == labels):.3f}, "
                f"timm {np.mean(torch_pred == labels):.3f}; same prediction on {np.mean(jax_pred == torch_pred):.1%}; "
                f"max |logit difference| {diff:.2e}")
          np.testing.assert_allclose(torch_logits, jax_logits, atol=1e-4, rtol=1e-4)
      '''),
      code('''
          import io

          import matplotlib.pyplot as plt
          from IPython.display import Image, display

          pre = model_defaults(model.spec_name)
          n = min(8, len(images))
          fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.4))
          for ax, img, y, pj, pt in zip(axes, images, labels, jax_pred, torch_pred):
              ax.imshow(np.clip(img * np.array(pre["std"]) + np.array(pre["mean"]), 0, 1))
              ax.set_title(f"label {y}\\nJAX {pj} | timm {pt}", fontsize=8)
              ax.axis("off")
          buf = io.BytesIO()
          fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
          plt.close(fig)
          display(Image(data=buf.getvalue()))
      '''),
      md("""
      ## The official layout

      `layout="official"` writes the key names of the official repository (for DeiT they are timm's; for
      AugViT, DeepViT, AttnScale/FeatScale, EViT and Shunted, which timm lacks, it is the only layout). A `.pth`
      holds `{"state_dict": ..., "metadata": ...}`: load it into the official class with
      `model.load_state_dict(torch.load(path)["state_dict"])`. `load_torch` reads it back into JAX (name and
      constructor arguments from the metadata); `python -m vit_jax_fix.convert from-torch` turns any such file
      into a trainer checkpoint for fine-tuning (`config.init_from.path`).
      """),
      code('''
          from vit_jax_fix.interop import load_torch

          official_path = os.path.join(OUT_DIR, "model_official.pth")
          export_checkpoint(CHECKPOINT, official_path, ema=EMA, layout="official")
          back, back_info = load_torch(official_path)
          back.eval()
          with jax.default_matmul_precision("highest"):
              back_logits = np.asarray(back(images))
          print(f"{official_path}: {back_info['name']} {back_info['overrides']}, "
                f"max |logit difference| after the round trip {np.abs(back_logits - jax_logits).max():.1e}")
          np.testing.assert_array_equal(back_logits.argmax(-1), jax_pred)
      '''),
  ]


NOTEBOOKS = {"quickstart": quickstart, "train_colab": train_colab, "convert_to_pytorch": convert_to_pytorch}


def build(name: str) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.cells = NOTEBOOKS[name]()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["accelerator"] = "TPU" if name == "train_colab" else "None"
  nb.metadata["colab"] = {"provenance": [], "toc_visible": True}
  # Stable cell ids, so rebuilding an unchanged notebook gives the same file.
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name[:12]}-{i:02d}"
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  return nbformat.writes(build(name)) + "\n"


def main(argv) -> int:
  check = "--check" in argv
  stale = []
  for name in NOTEBOOKS:
    path = HERE / f"{name}.ipynb"
    text = render(name)
    if check:
      if not path.exists() or path.read_text() != text:
        stale.append(path.name)
    else:
      path.write_text(text)
      print("wrote", path)
  if stale:
    print("out of date (run python notebooks/build_notebooks.py):", ", ".join(stale))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

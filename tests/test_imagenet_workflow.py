"""The paper's ImageNet workflow at tiny scale, built locally on CPU.

A generated ImageNet-layout tree of real JPEG files (varied sizes, a grayscale and a
CMYK JPEG), a torchvision resnet18 (``weights=None``) saved as ``.pth``, ``nemo-jax
convert``, then ``nemo-jax search`` with ``experiments/configs/paper_imagenet.py``
shrunk (1 generation, population 4): top-5 fitness on ``train``, final top-1 on
``val``. Only the stratified subsets' files are decoded.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from nemo_jax._src.data import files as files_lib
from nemo_jax._src.data import stratified_subset
from nemo_jax._src.problem import image_sets
from nemo_jax._src.run.config import load_search_config
from tests.conftest import REPO

CLASSES = 10
TRAIN_PER_CLASS = 12
VAL_PER_CLASS = 3


def _write_tree(root, rng):
  """``root/{train,val}/<wnid>/*.JPEG``; returns nothing (the layout is the data)."""
  for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
    for c in range(CLASSES):
      directory = os.path.join(root, split, f"n{c:08d}")
      os.makedirs(directory)
      for i in range(count):
        w, h = (int(v) for v in rng.integers(120, 300, 2))
        pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((w, h), Image.BILINEAR)
        if split == "train" and c == 0 and i == 0:
          image = image.convert("L")       # grayscale JPEG
        if split == "train" and c == 1 and i == 0:
          image = image.convert("CMYK")    # CMYK JPEG
        image.save(os.path.join(directory, f"img_{i:03d}.JPEG"), "JPEG", quality=90)


def test_paper_workflow_tiny(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  from nemo_jax import cli
  from nemo_jax._src.config_file import load_config_file

  root = str(tmp_path / "imagenet")
  _write_tree(root, np.random.default_rng(0))
  monkeypatch.setenv("NEMO_JAX_DATA_DIR", str(tmp_path / "data_cache"))

  torch.manual_seed(0)
  net = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
  pth = str(tmp_path / "resnet18.pth")
  torch.save(net.state_dict(), pth)
  ckpt = str(tmp_path / "resnet18.msgpack")
  assert cli.main(["convert", pth, "--model", "resnet18", "--out", ckpt,
                   "--input-shape", "224,224,3", "--num-classes", str(CLASSES)]) == 0

  cfg = load_config_file(os.path.join(REPO, "experiments", "configs", "paper_imagenet.py:"
                                      f"resnet50,checkpoint={ckpt},data_dir={root}"))
  cfg.update(model="resnet18", num_classes=CLASSES, eval_per_class=1, calib_per_class=1,
             selection_per_class=1, calib_batches=1, final_max_images=CLASSES, population=4, generations=1,
             species=["direct_round", "direct_floor"], min_species_size=2,
             eval_batch_size=10)
  config = str(tmp_path / "tiny_imagenet.json")
  with open(config, "w") as f:
    json.dump(cfg, f)

  decoded, lock = [], threading.Lock()
  original = files_lib.decode_image

  def spy(path):
    with lock:
      decoded.append(os.path.relpath(path, os.path.realpath(root)))
    return original(path)

  monkeypatch.setattr(files_lib, "decode_image", spy)
  out = str(tmp_path / "run")
  assert cli.main(["search", "--config", config, "--out", out, "--quiet"]) == 0

  # Only the stratified subsets were decoded: the disjoint fitness, calibration and
  # selection images of train (1 per class each) and 1 per class of val.
  train_paths, train_labels = files_lib.imagenet_split_files(root, "train")
  val_paths, val_labels = files_lib.imagenet_split_files(root, "validation")
  rel = lambda paths, idx: {os.path.relpath(paths[i], os.path.realpath(root)) for i in idx}
  run_cfg = load_search_config(config)
  sets = image_sets(run_cfg.problem, train_labels, run_cfg.search.seed,
                    run_cfg.run.selection_per_class)
  expected = set().union(*(rel(train_paths, idx) for idx in sets.values()))
  expected |= rel(val_paths, stratified_subset(val_labels, 1, seed=0))
  assert sorted(set(decoded)) == sorted(expected)
  assert len(decoded) == 4 * CLASSES     # each chosen file decoded once (then cached)
  assert len(expected) < CLASSES * (TRAIN_PER_CLASS + VAL_PER_CLASS) / 2

  front = json.load(open(os.path.join(out, "front.json")))
  uniform = json.load(open(os.path.join(out, "uniform.json")))
  assert front and len(uniform) == 7
  for m in front + uniform:
    assert 0.0 <= m["metrics"]["top5_error"] <= 1.0
    assert 0.0 <= m["final_top1"] <= 1.0
  saved = json.load(open(os.path.join(out, "config.json")))
  assert saved["config"]["problem"]["objectives"][0] == "top5_error"
  assert saved["config"]["run"]["final_split"] == "validation"
  assert saved["timing"]["final_population"] == 8 * -(-(len(front) + 7) // 8)

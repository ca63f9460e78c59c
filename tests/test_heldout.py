"""Held-out images: a checkpoint's training metadata decides where selection images come
from (``docs/DESIGN.md``, "Image sets"), per shipped model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_jax._src import checkpoint as ckpt
from nemo_jax._src import data as data_lib
from nemo_jax._src.problem import core as problem_core
from nemo_jax._src.problem.config import ProblemConfig
from nemo_jax._src.problem.images import image_sets


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(3, 12), st.integers(0, 3), st.integers(0, 99))
def test_held_out_split_is_a_stratified_partition(classes, per_class_total, per_class, seed):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(classes), per_class_total))
  train, held = data_lib.held_out_split(labels, per_class, seed)
  assert np.intersect1d(train, held).size == 0
  assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(len(labels)))
  assert np.array_equal(np.bincount(labels[held], minlength=classes),
                        np.full(classes, per_class))
  again = data_lib.held_out_split(labels, per_class, seed)
  assert np.array_equal(again[1], held)


def test_selection_images_only_from_the_held_out_part_the_rest_from_training():
  labels = np.repeat(np.arange(10), 50)
  cfg = ProblemConfig(eval_per_class=6, calib_per_class=3)
  idx = image_sets(cfg, labels, seed=3, selection_per_class=4, held_out=(8, 11))
  train, held = data_lib.held_out_split(labels, 8, 11)
  assert set(idx["selection"]) <= set(held)
  assert set(idx["fitness"]) <= set(train) and set(idx["calibration"]) <= set(train)
  assert len(idx["selection"]) == 40 and len(idx["fitness"]) == 60
  with pytest.raises(ValueError, match="selection_per_class=9 exceeds the 8"):
    image_sets(cfg, labels, seed=3, selection_per_class=9, held_out=(8, 11))


def _sidecar(tmp_path, held_out_per_class):
  path = tmp_path / "m.msgpack"
  path.write_bytes(b"")
  config = {"model": "resnet20", "dataset": "fashion_mnist_embedded", "epochs": 1,
            "held_out_per_class": held_out_per_class, "held_out_seed": 5}
  (tmp_path / "m.json").write_text(json.dumps({"config": config}))
  return str(path)


def test_a_checkpoint_trained_on_everything_makes_a_loud_warning(tmp_path):
  path = _sidecar(tmp_path, 0)
  cfg = ProblemConfig(checkpoint=path)
  with pytest.warns(UserWarning, match="selection_top1 is in sample"):
    assert problem_core.held_out_images(cfg, selection_per_class=4) is None
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # no selection set: nothing to warn about
    assert problem_core.held_out_images(cfg, selection_per_class=0) is None


def test_a_held_out_checkpoint_names_its_part_and_the_same_images_under_another_name(tmp_path):
  path = _sidecar(tmp_path, 7)
  assert problem_core.held_out_images(ProblemConfig(checkpoint=path), 4) == (7, 5)
  # fashion_mnist holds the same images as the embedded subset's source: same check.
  assert ckpt.same_data("fashion_mnist_embedded", "fashion_mnist_embedded")
  other = ProblemConfig(checkpoint=path, eval_split="test")
  assert problem_core.held_out_images(other, 4) is None


@pytest.mark.parametrize("model", sorted(ckpt.DEFAULT_CHECKPOINTS))
def test_every_shipped_checkpoint_holds_images_out_and_says_what_it_was_made_for(model):
  trained = ckpt.training_images("default", model)
  assert trained["held_out_per_class"] >= 50 and trained["split"] == "train"
  info = ckpt.checkpoint_info("default", model)
  assert info["model"] == model and info["num_classes"] == 10
  assert info["input_shape"] == [28, 28, 1]
  with open(ckpt.sidecar_path(ckpt.default_checkpoint(model))) as f:
    metrics = json.load(f)["metrics"]
  assert metrics["held_out_images"] == 10 * trained["held_out_per_class"]
  assert 0.5 < metrics["held_out_top1"] <= 1 and 0.5 < metrics["test_top1"] <= 1


def test_default_is_per_model_and_a_model_without_one_is_named():
  assert ckpt.resolve_checkpoint("default", "resnet20").endswith("resnet20_fashion_mnist.msgpack")
  assert ckpt.resolve_checkpoint("x.msgpack", "resnet20") == "x.msgpack"
  with pytest.raises(ValueError, match=r"model='vgg16_cifar'.*allowed: checkpoint='default' "
                     r"with model in \['mobilenet_v2_small', 'resnet20'\]"):
    ckpt.load_model("vgg16_cifar", "default", (32, 32, 3), 10)

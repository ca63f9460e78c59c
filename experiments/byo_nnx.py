"""Bring your own Flax NNX model: a small NNX CNN, trained briefly, searched without edits.

The model is plain ``flax.nnx`` (``nnx.Conv`` layers with ``nnx.BatchNorm``, a residual
block, dropout driven by a ``train`` flag, an ``nnx.Linear`` head). It is trained in
float with ``nnx.Optimizer`` on the embedded Fashion-MNIST subset, then searched with
the in-memory data, the module itself as the model (no variables: its state is inside):

    nemo_jax.search(config, model=cnn, data={"train": ..., "test": ...})

Every ``nnx.Conv`` / ``nnx.Linear`` call is quantized and pruned on a merged copy of the
module (``docs/DESIGN.md``, "Your own model"); the module is called in inference mode
(``train=False``, BatchNorm on its running statistics, dropout off). 6 quantized layers
(``nemo-jax layers``): ``conv1/conv``, ``conv2/conv``, ``block/conv_a/conv``,
``block/conv_b/conv``, ``conv3/conv``, ``head``; 42,618 parameters, 5.53M MACs per image;
the data-flow edges include the residual skip (``conv2 -> conv3``).

Also usable as a factory for the command line (untrained weights):
``"model": "experiments/byo_nnx.py:make_model"``; ``nemo-jax layers
experiments/byo_nnx.py:make_model --input-shape 28,28,1`` lists its quantizers.

    python experiments/byo_nnx.py [--epochs 3] [--generations 4] [--out runs/byo_nnx]

Measured (2 shared CPU cores, ``--epochs 3 --generations 4``, population 16, 4 species;
``python experiments/byo_nnx.py --out runs/byo_nnx``): float test top-1 0.8095 after 48 s
of training (3 epochs, 10,000 images); the search took 85 s (calibration, sensitivity,
5 generations = 80 evaluations on 100 fitness images, final phase on 1,000 test + 500
selection images; 145 s wall for the whole script). 11 front members; uniform W8A8 keeps
0.801 test top-1 at BOPs ratio 0.0625. Front (test top-1 / BOPs ratio / model ratio):
0.807 / 0.048 / 0.225 (W7A7), 0.802 / 0.032 / 0.163 (W5, A 5-7), 0.783 / 0.026 / 0.167
(mixed W 4-7, A 3-7), 0.755 / 0.019 / 0.102 (mixed W 2-5, A 4-6), 0.754 / 0.012 / 0.102
(W7A7 first layer, W3A3 elsewhere), 0.706 / 0.0088 / 0.101 (W3A3), down to 0.281 at W2A2.
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import nemo_jax
from nemo_jax import data as data_lib

DATASET = "fashion_mnist_embedded"


class ConvBN(nnx.Module):
  def __init__(self, cin, cout, strides, rngs):
    self.conv = nnx.Conv(cin, cout, (3, 3), strides, padding=1, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)

  def __call__(self, x, train):
    return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


class Residual(nnx.Module):
  def __init__(self, c, rngs):
    self.conv_a = ConvBN(c, c, 1, rngs)
    self.conv_b = ConvBN(c, c, 1, rngs)

  def __call__(self, x, train):
    return x + self.conv_b(self.conv_a(x, train), train)


class CNN(nnx.Module):
  """28x28 -> 14x14 -> 7x7, a residual block at 14x14, global average pool, dropout."""

  def __init__(self, rngs: nnx.Rngs, num_classes: int = 10, width: int = 16):
    self.conv1 = ConvBN(1, width, 1, rngs)
    self.conv2 = ConvBN(width, 2 * width, 2, rngs)
    self.block = Residual(2 * width, rngs)
    self.conv3 = ConvBN(2 * width, 4 * width, 2, rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(4 * width, num_classes, rngs=rngs)

  def __call__(self, x, train: bool = False):
    x = self.conv1(x, train)
    x = self.block(self.conv2(x, train), train)
    x = jnp.mean(self.conv3(x, train), axis=(1, 2))
    return self.head(self.drop(x, deterministic=not train))


def make_model(seed: int = 0) -> CNN:
  """Factory for ``"model": "experiments/byo_nnx.py:make_model"`` (untrained)."""
  return CNN(nnx.Rngs(seed))


def train(model: CNN, x, y, epochs: int, seed: int = 0, batch: int = 128, lr: float = 3e-3):
  """A few epochs of AdamW with a cosine schedule (float, train mode); in place."""
  steps = epochs * (len(x) // batch)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 10, 1), steps),
                   weight_decay=1e-4)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss_fn(model):
      logits = model(xb, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(x))
    for s in range(len(x) // batch):
      idx = order[s * batch:(s + 1) * batch]
      loss = step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    print(f"epoch {epoch + 1}/{epochs}: loss {float(loss):.3f}")
  return model


def accuracy(model: CNN, x, y) -> float:
  predict = nnx.jit(lambda m, xb: jnp.argmax(m(xb, train=False), -1))
  hits = sum(int(np.sum(np.asarray(predict(model, jnp.asarray(x[s:s + 500]))) == y[s:s + 500]))
             for s in range(0, len(x), 500))
  return hits / len(x)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--generations", type=int, default=4)
  p.add_argument("--population", type=int, default=16)
  p.add_argument("--out", default=None)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)

  splits = {}
  for split in ("train", "test"):
    images, labels = data_lib.load_split(DATASET, split)
    splits[split] = (data_lib.preprocess(DATASET, images), labels.astype(np.int32))
  cnn = make_model(args.seed)
  t0 = time.perf_counter()
  train(cnn, *splits["train"], epochs=args.epochs, seed=args.seed)
  train_s = time.perf_counter() - t0
  float_top1 = accuracy(cnn, *splits["test"])
  print(f"float NNX CNN: test top-1 {float_top1:.4f} after {args.epochs} epochs "
        f"({train_s:.0f} s)")

  config = {"eval_per_class": 10, "calib_per_class": 10, "calib_batches": 2,
            "final_max_images": 1000, "population": args.population,
            "generations": args.generations, "edges": "dataflow", "min_species_size": 2,
            "species": [{"kind": "direct_round"}, {"kind": "direct_floor"},
                        {"kind": "gcn", "hidden": 16}, {"kind": "graph_unet", "hidden": 16}],
            "seed": args.seed}
  t0 = time.perf_counter()
  result = nemo_jax.search(config, out_dir=args.out, model=cnn, data=splits, progress=True)
  search_s = time.perf_counter() - t0
  print(nemo_jax.front_table(result.front, result.config.objectives))
  best8 = next(m for m in result.uniform if m["bits"] == 8)
  print(json.dumps({
      "float_test_top1": round(float_top1, 4), "train_seconds": round(train_s, 1),
      "search_seconds": round(search_s, 1), "front_size": len(result.front),
      "uniform_w8a8_final_top1": round(best8.get("final_top1", float("nan")), 4),
      "uniform_w8a8_bops_ratio": round(best8["metrics"]["bops_ratio"], 4),
      "front": [{"final_top1": round(m.get("final_top1", float("nan")), 4),
                 "w_bits": m["w_bits"], "a_bits": m["a_bits"], "keep": m["keep"],
                 **{n: round(v, 4) for n, v in m["objectives"].items()}}
                for m in result.front]}))


if __name__ == "__main__":
  main()

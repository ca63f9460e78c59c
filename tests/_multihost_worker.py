"""Worker process for tests/test_distributed.py (and a usable launch example).

Evaluates a fixed, seeded population of a small QConv/QDense + BatchNorm model and
writes the results to an .npz file. Modes:

* ``--num-processes 1``: one process with however many devices XLA_FLAGS gives it.
* ``--num-processes 2 --process-id I --port PORT``: joins a 2-process job on 127.0.0.1
  (``distributed.initialize`` BEFORE any other JAX call).

``build_problem()`` is imported by the tests to compute the single-device reference.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

POPULATION = 6      # not a multiple of 4 devices: exercises padding
NUM_IMAGES = 37     # not a multiple of the batch: exercises masking
BATCH_SIZE = 16


def make_model():
  """A small residual CNN of QConv/QDense + BatchNorm (5 quantized layers)."""
  import flax.linen as nn
  from nemo_jax._src.layers import QConv, QDense

  class SmallNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, ctx=None, train=False):
      bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
      x = nn.relu(bn()(QConv(8, 3)(x, ctx)))
      y = nn.relu(bn()(QConv(8, 3)(x, ctx)))
      y = bn()(QConv(8, 3)(y, ctx))
      x = nn.relu(x + y)
      x = nn.relu(bn()(QConv(16, 3, strides=2)(x, ctx)))
      return QDense(self.num_classes)(x.mean(axis=(1, 2)), ctx)

  return SmallNet()


def random_batch_stats(variables, seed: int):
  """Non-trivial BatchNorm statistics so BN matters (init gives mean 0, var 1)."""
  import jax
  rng = np.random.default_rng(seed)
  def perturb(path, leaf):
    name = jax.tree_util.keystr(path)
    if "mean" in name:
      return np.asarray(rng.normal(0, 0.2, leaf.shape), np.float32)
    return np.asarray(rng.uniform(0.5, 2.0, leaf.shape), np.float32)
  stats = jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"])
  return {"params": variables["params"], "batch_stats": stats}


def build_problem(seed: int = 0):
  """(model, variables, calibration, images, labels, configs), deterministic in seed."""
  import jax
  import jax.numpy as jnp
  from nemo_jax import evaluation
  from nemo_jax._src.qconfig import QuantConfig

  rng = np.random.default_rng(seed)
  model = make_model()
  images = rng.normal(size=(NUM_IMAGES, 10, 10, 1)).astype(np.float32)
  labels = rng.integers(0, 10, NUM_IMAGES).astype(np.int32)
  variables = model.init(jax.random.key(seed), jnp.asarray(images[:1]))
  variables = random_batch_stats(variables, seed)
  calibration = evaluation.calibrate(model, variables, images, batch_size=BATCH_SIZE)
  num_layers = calibration.num_layers
  configs = QuantConfig(
      w_bits=jnp.asarray(rng.integers(2, 9, (POPULATION, num_layers)), jnp.int32),
      a_bits=jnp.asarray(rng.integers(2, 9, (POPULATION, num_layers)), jnp.int32),
      keep=jnp.asarray(rng.uniform(0.3, 1.0, POPULATION), jnp.float32))
  return model, variables, calibration, images, labels, configs


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--strategy", default="map")
  args = parser.parse_args(argv)

  import jax
  if args.num_processes > 1:
    # Joined BEFORE importing nemo_jax: importing the package imports evosax, whose
    # import runs a JAX computation, after which jax.distributed.initialize refuses.
    # (Same call as nemo_jax._src.distributed.initialize.)
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=60)
  from nemo_jax import evaluation

  model, variables, calibration, images, labels, configs = build_problem()
  spec = evaluation.QuantSpec(weight_quant="symmetric_per_channel")
  evaluator = evaluation.Evaluator(model, variables, evaluation.ptq_scheme(calibration, spec),
                                   images, labels, batch_size=BATCH_SIZE,
                                   strategy=args.strategy)
  result = evaluator(configs)
  np.savez(args.out, top1=result.top1, top5=result.top5, loss=result.loss,
           num_devices=len(jax.devices()), num_local_devices=len(jax.local_devices()),
           num_processes=jax.process_count(), mesh_size=evaluator.num_devices)
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()

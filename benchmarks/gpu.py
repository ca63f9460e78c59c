"""The GPU benchmark: one command, one JSON line, sized to fit 8 minutes on one H100.

1. Evaluation: MobileNet-V2 and ResNet-50 at 224x224x3 (random weights, 1000 classes,
   random images), a population of 8 and of 32 random mixed-precision configurations on
   ``--images`` (5,000) images, with ``vmap`` and with ``lax.map`` over the members:
   seconds per configuration (after the compiling call, which is reported apart) and
   image-configurations per second. Goal: <= 0.5 s per MobileNet-V2 configuration on one
   H100 (NEMO's paper needed ~60 s).
2. Search: a 2-generation search with the paper's ImageNet config
   (``experiments/configs/paper_imagenet.py``, NNCF placement, top-5 fitness) on a
   generated ImageNet-layout tree of real JPEG files (``--search-classes`` classes; the
   model keeps 1000 outputs), with the run's own timing per phase.
3. Device memory: the peak bytes in use (``Device.memory_stats``, where the backend
   reports it).

    python benchmarks/gpu.py                       # on the GPU machine
    JAX_PLATFORMS=cpu python benchmarks/gpu.py --images 4 --populations 2 \\
        --models mobilenet_v2 --strategies map --search-classes 4 --search-model resnet18
                                                   # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import nemo_jax  # noqa: E402
from nemo_jax import QuantConfig, evaluation, models  # noqa: E402

SHAPE = (224, 224, 3)
CLASSES = 1000


def peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def random_configs(num_layers: int, num_acts: int, population: int, seed: int):
  rng = np.random.default_rng(seed)
  return QuantConfig(w_bits=jnp.asarray(rng.integers(2, 9, (population, num_layers)), jnp.int32),
                     a_bits=jnp.asarray(rng.integers(2, 9, (population, num_acts)), jnp.int32),
                     keep=jnp.asarray(rng.uniform(0.5, 1.0, population), jnp.float32))


def evaluation_figures(name: str, images: int, populations, strategies, batch_size: int):
  """Seconds per configuration of ``name`` per strategy and population."""
  model = models.get_model(name, SHAPE, CLASSES)
  variables = models.init_variables(model, jax.random.key(0), SHAPE)
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (images, *SHAPE), dtype=np.uint8)
  y = rng.integers(0, CLASSES, images).astype(np.int32)
  pre = lambda b: (np.asarray(b, np.float32) / 255.0 - 0.45) / 0.225
  calib = evaluation.calibrate(model, variables, pre(x[:min(64, images)]),
                               batch_size=min(32, images))
  scheme = evaluation.ptq_scheme(calib)
  out = {}
  for strategy in strategies:
    ev = evaluation.Evaluator(model, variables, scheme, x, y, batch_size=batch_size,
                              strategy=strategy, preprocess=pre)
    row = {}
    for population in populations:
      configs = random_configs(ev.num_layers, ev.num_act_quantizers, population, population)
      start = time.perf_counter()
      jax.block_until_ready(ev.run(configs).top1)
      first = time.perf_counter() - start
      start = time.perf_counter()
      jax.block_until_ready(ev.run(configs).top1)
      seconds = time.perf_counter() - start
      row[str(population)] = {"first_call_s": round(first, 2), "seconds": round(seconds, 3),
                              "seconds_per_config": round(seconds / population, 4),
                              "image_configs_per_s": round(images * population / seconds, 1)}
    out[strategy] = row
    del ev
  return out


def write_imagenet_tree(root: str, classes: int, train_per_class: int, val_per_class: int):
  """``root/{train,val}/<wnid>/*.JPEG`` of random JPEG images of varied sizes."""
  rng = np.random.default_rng(0)
  for split, count in (("train", train_per_class), ("val", val_per_class)):
    for c in range(classes):
      directory = os.path.join(root, split, f"n{c:08d}")
      os.makedirs(directory, exist_ok=True)
      for i in range(count):
        w, h = (int(v) for v in rng.integers(240, 400, 2))
        pixels = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(
            os.path.join(directory, f"img_{i:04d}.JPEG"), "JPEG", quality=85)


def search_figures(work: str, model_name: str, classes: int, population: int):
  """A 2-generation paper-config search on generated ImageNet files; its phases."""
  root = os.path.join(work, "imagenet")
  start = time.perf_counter()
  # Per class: 5 fitness + 1 calibration + 2 selection training images, 4 validation.
  write_imagenet_tree(root, classes, 8, 4)
  generate = time.perf_counter() - start
  model = models.get_model(model_name, SHAPE, CLASSES)
  ckpt = os.path.join(work, f"{model_name}.msgpack")
  models.save_variables(ckpt, models.init_variables(model, jax.random.key(0), SHAPE))
  config = nemo_jax.load_config_file(os.path.join(
      os.path.dirname(__file__), "..", "experiments", "configs",
      f"paper_imagenet.py:{'resnet50' if model_name == 'resnet18' else model_name},"
      f"checkpoint={ckpt},data_dir={root}"))
  config["problem"].update(model=model_name)
  config["search"].update(generations=2, population=population, min_species_size=2)
  config["run"].update(selection_per_class=2, final_max_images=classes * 4)
  start = time.perf_counter()
  os.environ.setdefault("NEMO_JAX_DATA_DIR", os.path.join(work, "data_cache"))
  result = nemo_jax.search(config, out_dir=os.path.join(work, "run"), progress=False)
  wall = time.perf_counter() - start
  return {"model": model_name, "classes": classes, "population": population,
          "generate_files_s": round(generate, 2), "search_wall_s": round(wall, 2),
          "timing": result.timing, "front_size": len(result.front),
          "generation_seconds": [r["seconds"] for r in result.history],
          "compiles_per_generation": [r["compiles"] for r in result.history]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=5000)
  p.add_argument("--populations", default="8,32")
  p.add_argument("--models", default="mobilenet_v2,resnet50")
  p.add_argument("--strategies", default="vmap,map")
  p.add_argument("--batch-size", type=int, default=250)
  p.add_argument("--search-model", default="mobilenet_v2")
  p.add_argument("--search-classes", type=int, default=100)
  p.add_argument("--search-population", type=int, default=32)
  p.add_argument("--skip-search", action="store_true")
  args = p.parse_args(argv)
  populations = [int(v) for v in args.populations.split(",")]
  out = {"benchmark": "gpu", "backend": jax.default_backend(),
         "device": str(jax.devices()[0]), "images": args.images,
         "target_seconds_per_mobilenet_config": 0.5, "evaluation": {}}
  start = time.perf_counter()
  for name in args.models.split(","):
    out["evaluation"][name] = evaluation_figures(name, args.images, populations,
                                                 args.strategies.split(","),
                                                 min(args.batch_size, args.images))
  out["evaluation_wall_s"] = round(time.perf_counter() - start, 2)
  if not args.skip_search:
    with tempfile.TemporaryDirectory(prefix="nemo_jax_gpu_") as work:
      out["search"] = search_figures(work, args.search_model, args.search_classes,
                                     args.search_population)
  out["peak_device_bytes"] = peak_bytes()
  out["total_wall_s"] = round(time.perf_counter() - start, 2)
  print(json.dumps(out))


if __name__ == "__main__":
  main()

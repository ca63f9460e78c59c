"""After the search loop: the front as members, the uniform baselines, the held-out scores.

The final phase (``docs/DESIGN.md``, "Streaming evaluation and the final phase") turns
the archive into front members (:func:`front_members`), evaluates the uniform baselines
(:func:`uniform_baselines`) and re-evaluates every front member and baseline on the
selection images and the test split (:func:`report_sets`, :func:`add_accuracy`), all
through the fitness evaluator's compiled function in one population size
(:func:`final_size`). :func:`front_hypervolumes` gives the final front's hypervolume per
image set.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tqdm.auto import tqdm

from nemo_jax._src import pareto
from nemo_jax._src import quant
from nemo_jax._src.problem import Problem, capped_split, cheapest_config, selection_data
from nemo_jax._src.qconfig import QuantConfig
from nemo_jax._src.run import quality
from nemo_jax._src.run.config import SearchConfig

FINAL_PAD = 8
"""Final-phase members per device are padded to a multiple of this (``final_size``)."""

HYPERVOLUME_SETS = {"fitness": None, "selection": "selection_top1", "test": "final_top1"}
"""Image set -> the member key whose top-1 replaces the fitness top-1 error (None: the
searched objectives themselves)."""


def raw_matrix(raw: Mapping[str, np.ndarray], names) -> np.ndarray:
  """``[P, R]`` float32 of the raw quantities ``names``."""
  return np.stack([np.asarray(raw[n], np.float32) for n in names], axis=-1)


def members(problem: Problem, choice, keep_idx, species, generation, raw, labels) -> list[dict]:
  """Member dicts (the ``front.json`` form) of decoded choices and their raw quantities.

  Args:
    problem: the problem (decodes, names the objectives and raw quantities).
    choice, keep_idx: ``[P, num_active]`` / ``[P]`` indices.
    species, generation: ``[P]`` species index and generation, or None (uniform
      baselines: species ``"uniform"``, generation 0).
    raw: ``[P, R]`` raw quantities (``problem.raw_names``).
    labels: species labels.
  """
  configs = problem.decode(jnp.asarray(choice), jnp.asarray(keep_idx))
  out = []
  for i in range(len(keep_idx)):
    metrics = {n: float(raw[i, j]) for j, n in enumerate(problem.raw_names)}
    out.append({
        "w_bits": [int(b) for b in np.asarray(configs.w_bits[i])],
        "a_bits": [int(b) for b in np.asarray(configs.a_bits[i])],
        "keep": float(configs.keep[i]),
        "species": labels[int(species[i])] if species is not None else "uniform",
        "generation": int(generation[i]) if generation is not None else 0,
        "objectives": {n: metrics[n] for n in problem.objective_names},
        "metrics": metrics,
    })
  return out


def front_members(problem: Problem, archive, labels) -> list[dict]:
  """The feasible non-dominated archive as member dicts, sorted by objectives."""
  a = jax.tree.map(np.asarray, archive)
  ok = a.valid & (a.violation <= 0)
  if not ok.any():  # nothing feasible: report the least-violating configurations
    ok = a.valid & (a.violation <= a.violation[a.valid].min(initial=np.inf))
  idx = np.nonzero(ok)[0]
  idx = idx[np.lexsort(tuple(a.F[idx, j] for j in reversed(range(a.F.shape[1]))))]
  return members(problem, a.choice[idx], a.keep_idx[idx], a.species[idx], a.generation[idx],
                 a.raw[idx], labels)


def uniform_baselines(problem: Problem, pad_to: int | None = None) -> list[dict]:
  """Uniform precision W = A = b for every bit choice (keep = largest keep choice).

  ``pad_to``: the population size to evaluate them as (``final_size``; None: the
  generation's).
  """
  cfg = problem.cfg
  k = len(cfg.bit_choices)
  choice = jnp.tile(jnp.arange(k, dtype=jnp.int32)[:, None], (1, len(problem.space.active_nodes)))
  keep_idx = jnp.full((k,), len(cfg.keep_choices) - 1, jnp.int32)
  _, _, raw = problem.objectives(problem.decode(choice, keep_idx), pad_to=pad_to)
  out = members(problem, choice, keep_idx, None, None, raw_matrix(raw, problem.raw_names), None)
  for m, b in zip(out, cfg.bit_choices):
    m["bits"] = int(b)
  return out


def reference_members(problem: Problem, pad_to: int | None = None) -> dict[str, dict]:
  """The configurations the quality metrics are normalised by (``quality.py``):
  ``fp32`` (every quantizer float, keep 1; its fitness accuracy measured), ``cheapest``
  (every searched quantizer at the smallest bit choice, smallest keep) and ``w8a8``
  (weights at 8 bits, searched activations at 8, keep 1); the last two are costed only.
  """
  wl, cfg = problem.workload, problem.cfg
  L, La = wl.num_layers, wl.num_act_quantizers
  act8 = 8 if cfg.quantize_activations else cfg.act_fill_bits
  configs = {
      "fp32": QuantConfig(w_bits=jnp.full((1, L), quant.FLOAT_BITS, jnp.int32),
                          a_bits=jnp.full((1, La), quant.FLOAT_BITS, jnp.int32),
                          keep=jnp.ones((1,), jnp.float32)),
      "cheapest": cheapest_config(cfg, wl),
      "w8a8": QuantConfig(w_bits=jnp.full((1, L), 8, jnp.int32),
                          a_bits=jnp.full((1, La), act8, jnp.int32),
                          keep=jnp.ones((1,), jnp.float32))}
  out = {}
  for name, config in configs.items():
    raw = {k: np.asarray(x, np.float64) for k, x in problem.costs(config).items()}
    if name == "fp32" and problem.needs_accuracy:
      raw.update(problem.accuracy(config, pad_to=pad_to))
    metrics = {n: float(raw[n][0]) for n in problem.raw_names if n in raw}
    out[name] = {"w_bits": [int(b) for b in np.asarray(config.w_bits[0])],
                 "a_bits": [int(b) for b in np.asarray(config.a_bits[0])],
                 "keep": float(config.keep[0]), "species": name, "generation": 0,
                 "objectives": {n: (float(problem.normalise(n, raw[n])[0]) if n in raw
                                    else float("nan")) for n in problem.objective_names},
                 "metrics": metrics}
  return out


def report_sets(problem: Problem, cfg: SearchConfig) -> dict:
  """``{member key: (images, labels, preprocess)}``: the sets every front member and
  uniform baseline is re-evaluated on after the search (``docs/DESIGN.md``, "Image
  sets"): ``selection_top1`` on the selection set (held-out ``eval_split`` images;
  reports pick members by it) and ``final_top1`` on the ``final_split`` subset (the test
  set, only reported, streamed from files when they are large); each only when
  configured. ``preprocess`` is None: the images are preprocessed (lazily for files)."""
  run, sets = cfg.run, {}
  if run.selection_per_class > 0:
    sets["selection_top1"] = (*selection_data(problem.cfg, cfg.image_seed,
                                              run.selection_per_class, problem.data,
                                              problem.held_out), None)
  if run.final_split is not None:
    sets["final_top1"] = (*capped_split(problem.cfg, run.final_split, run.final_max_images,
                                        cfg.image_seed, problem.data), None)
  return sets


def materialise(source) -> tuple[np.ndarray, np.ndarray]:
  """``(images preprocessed, labels)`` in memory from an ``(images, labels, preprocess)``
  source (:func:`report_sets`)."""
  images, labels, pre = source
  images = np.asarray(images)
  return (images if pre is None else pre(images)), labels


def final_size(problem: Problem, num_members: int) -> int:
  """The one population size of the final phase (uniform baselines + final re-evaluation).

  ``num_members`` padded to a multiple of ``FINAL_PAD`` per device: fewer than
  ``FINAL_PAD`` wasted slots per device, and when that equals the generation's padded
  size (``problem.evaluator``'s) the final phase compiles nothing.
  """
  unit = FINAL_PAD * problem.evaluator.num_devices
  return max(unit, -(-num_members // unit) * unit)


def add_accuracy(problem: Problem, data, entries: list[dict], pad_to: int | None = None,
                 key: str = "final_top1", on_block=None) -> None:
  """Adds ``key`` (top-1 fraction on the images of ``data``, an ``(images, labels,
  preprocess)`` source) to every member dict, in place.

  All members in ONE call of the fitness evaluator's compiled function, the images
  streamed through it in blocks of its shape (``Evaluator.run_images``).
  """
  if not entries:
    return
  images, labels, pre = data
  configs = problem.configs([m["keep"] for m in entries], [m["w_bits"] for m in entries],
                            [m["a_bits"] for m in entries])
  top1 = np.asarray(problem.evaluator.run_images(configs, images, labels, preprocess=pre,
                                                 pad_to=pad_to, on_block=on_block).top1)
  for m, t in zip(entries, top1):
    m[key] = float(t)


def final_phase(problem: Problem, cfg: SearchConfig, front: list[dict],
                progress: bool = False) -> tuple[list, dict, int | None]:
  """The uniform baselines, the reference configurations and the held-out scores of the
  front (added to its members in place).

  Every evaluation runs through the fitness evaluator's compiled functions: the
  baselines' fitness scores at the smaller compiled size that holds them, the held-out
  scores of front + baselines + FP32 in one population of :func:`final_size`.

  Returns:
    ``(uniform baselines, reference members, final population size or None)``.
  """
  sets = report_sets(problem, cfg)
  size = uniform_size = None
  num_bits = len(problem.cfg.bit_choices)
  if sets:
    size = final_size(problem, len(front) + num_bits + 1)
    # The baselines' fitness call: the smaller of the two compiled sizes that holds them.
    generation_size = problem.evaluator.padded_size(cfg.search.population)
    uniform_size = min(s for s in (size, generation_size) if s >= num_bits)
  uniform = uniform_baselines(problem, pad_to=uniform_size)
  references = reference_members(problem, pad_to=uniform_size)
  everyone = front + uniform + [references["fp32"]]
  total = sum(len(data[1]) for data in sets.values())
  with tqdm(total=total, disable=not progress or not total, unit="img",
            desc=f"final phase ({len(everyone)} configurations)") as bar:
    for key, data in sets.items():
      add_accuracy(problem, data, everyone, pad_to=size, key=key, on_block=bar.update)
  return uniform, references, size


def front_quality(cfg: SearchConfig, front: list[dict], uniform: list[dict],
                  references: Mapping[str, Mapping]) -> dict:
  """The quality metrics of a front (``quality.quality_report``), or {} without a
  ``top1_error`` objective."""
  if "top1_error" not in cfg.problem.objectives:
    return {}
  return quality.quality_report(front, uniform, cfg.problem.objectives, references)


def front_objectives(entries: Sequence[Mapping], cfg: SearchConfig,
                     images: str = "fitness") -> np.ndarray | None:
  """``[N, M]`` normalised objectives of members, the ``top1_error`` objective taken on
  ``images``.

  ``images``: ``fitness`` (what the search optimised: in sample), ``selection`` or
  ``test`` (``selection_top1`` / ``final_top1`` of the final phase: out of sample;
  ``docs/DESIGN.md``, "Image sets").

  Returns:
    The matrix, or None when ``images`` was not measured (a member lacks the key, or
    ``top1_error`` is not an objective).

  Raises:
    ValueError: ``images`` is not one of ``HYPERVOLUME_SETS``.
  """
  if images not in HYPERVOLUME_SETS:
    raise ValueError(f"images={images!r}; allowed: {list(HYPERVOLUME_SETS)}")
  # Flat reads (``SearchConfig`` resolves them through ``FLAT_KEYS``): any config with
  # ``objectives`` / ``hv_ref`` attributes is accepted, as before the sections.
  names, key = list(cfg.objectives), HYPERVOLUME_SETS[images]
  F = np.asarray([[m["objectives"][n] for n in names] for m in entries],
                 np.float64).reshape(len(entries), len(names))
  if key is not None:
    if "top1_error" not in names or any(key not in m for m in entries):
      return None
    F[:, names.index("top1_error")] = [1.0 - m[key] for m in entries]
  return F


def front_hypervolume(entries: Sequence[Mapping], cfg: SearchConfig,
                      images: str = "fitness") -> float | None:
  """Hypervolume (reference ``hv_ref``, default 1 per objective) of
  ``front_objectives(entries, cfg, images)``; members that the other image set makes
  dominated add nothing. 0.0 for no members, None when ``images`` was not measured."""
  F = front_objectives(entries, cfg, images)
  if F is None or not len(F):
    return None if F is None else 0.0
  return float(pareto.hypervolume(jnp.asarray(F, jnp.float32),
                                  jnp.asarray(pareto.reference_point(
                                      cfg.hv_ref, len(cfg.objectives)),
                                      jnp.float32)))


def front_hypervolumes(entries: Sequence[Mapping], cfg: SearchConfig) -> dict[str, float]:
  """``{image set: front_hypervolume}`` for every set the members were measured on."""
  hv = {k: front_hypervolume(entries, cfg, k) for k in HYPERVOLUME_SETS}
  return {k: x for k, x in hv.items() if x is not None}

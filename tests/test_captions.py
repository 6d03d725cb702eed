"""Captions: tiny offline GIT and BLIP models through Captioner and CaptionStage.

The tiny models have random weights, so their captions are random words; the tests check
counts, rows and limits, and that the pipeline's caption is exactly what the model gives
when called directly with its own processor on the same frames.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.config import CaptionsConfig, ModelsConfig, RunConfig
from workers.captions import Captioner, CaptionStage, spread_indices
from workers.models import FramePreparer, ModelLoadError, load_image_processor
from workers.synthetic import scene_frames, write_video
from workers.task import SampledFrames, Segment, VideoMeta, VideoRef, VideoTask
from workers.tiny_captions import build_tiny_blip, build_tiny_git, tiny_vocab

FPS = 25.0
TOTAL_FRAMES = 60
#: scene cuts of the synthetic clip: segments are frames 0-14, 15-39 and 40-59.
CUTS = (15, 40)
#: every fifth frame is sampled: 3, 5 and 4 sampled frames in the three segments.
SAMPLED = np.arange(0, TOTAL_FRAMES, 5)
MAX_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def tiny_captioners(tmp_path_factory) -> dict[str, Path]:
    """The tiny models, built once for the module."""
    root = tmp_path_factory.mktemp("captioners")
    return {"git": build_tiny_git(root / "git", num_frames=6), "blip": build_tiny_blip(root / "blip"),
            "git_image": build_tiny_git(root / "git_image", num_frames=None)}


@pytest.fixture(scope="module")
def decoded_frames(tmp_path_factory) -> np.ndarray:
    """The sampled frames of a synthetic three-scene clip, as decord decodes them: [12, H, W, 3]."""
    import decord

    path = write_video(tmp_path_factory.mktemp("clips") / "scenes.mp4",
                       scene_frames(list(CUTS), TOTAL_FRAMES, 160, 96), fps=FPS)
    reader = decord.VideoReader(str(path))
    return reader.get_batch(SAMPLED.tolist()).asnumpy()


def run_config(model: Path, **captions) -> RunConfig:
    """A CPU run configuration captioning with a tiny model."""
    return RunConfig(
        stages=("captions",),
        models=ModelsConfig(captions=str(model), device="cpu", dtype="float32"),
        captions=CaptionsConfig(max_new_tokens=MAX_NEW_TOKENS, **captions),
    )


def make_task(frames: np.ndarray, model: Path, cuts=CUTS, video_id: str = "scenes") -> VideoTask:
    """A task as the decode and shots stages leave it: meta, segments, sampled and prepared frames."""
    bounds = [0, *cuts, TOTAL_FRAMES]
    segments = [
        Segment(index=i, start_frame=start, end_frame=end - 1, start_s=start / FPS, end_s=end / FPS,
                confidence=1.0, source="transnetv2", keyframe_index=(start + end - 1) // 2)
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
    segment_of_frame = np.searchsorted(np.asarray(cuts), SAMPLED, side="right").astype(np.int32)
    preparer = FramePreparer(load_image_processor(str(model), ModelsConfig(captions=str(model)), "captions"),
                             "captions")
    sampled = SampledFrames(frame_index=SAMPLED.astype(np.int64), timestamp_s=SAMPLED / FPS,
                            segment_index=segment_of_frame, prepared={"captions": preparer.prepare(frames)})
    meta = VideoMeta(duration_s=TOTAL_FRAMES / FPS, fps=FPS, frame_count=TOTAL_FRAMES, width=160, height=96,
                     codec="h264", rotation=0, has_audio=False, container="mp4", decoder="decord")
    ref = VideoRef(uri=f"file:///{video_id}.mp4", size_bytes=1, mtime_ns=0, etag=None, video_id=video_id)
    return VideoTask(ref=ref, meta=meta, segments=segments, frames=sampled)


@pytest.fixture(scope="module")
def stages(tiny_captioners) -> dict[str, CaptionStage]:
    """One CaptionStage per tiny model, loaded once."""
    return {name: CaptionStage(run_config(folder)) for name, folder in tiny_captioners.items()}


def direct_caption(stage: CaptionStage, frames: list[np.ndarray], video: bool) -> str:
    """The caption from the model itself: its own processor on raw frames, greedy generate."""
    captioner = stage.captioner
    pixel_values = captioner.processor(images=frames, return_tensors="pt")["pixel_values"]
    if video:
        pixel_values = pixel_values.reshape(1, len(frames), *pixel_values.shape[1:])
    with torch.inference_mode():
        token_ids = captioner.model.generate(pixel_values=pixel_values, max_new_tokens=MAX_NEW_TOKENS,
                                             num_beams=1, do_sample=False)
    return captioner.processor.batch_decode(token_ids, skip_special_tokens=True)[0].strip()


def test_tiny_models_are_small_and_tokenise_english(tiny_captioners):
    for folder in tiny_captioners.values():
        size = sum(f.stat().st_size for f in folder.iterdir())
        assert size < 2 * 1024 * 1024
        assert (folder / "model.safetensors").is_file() and (folder / "vocab.txt").is_file()
    processor = load_image_processor(str(tiny_captioners["git"]), ModelsConfig(), "captions")
    ids = processor.tokenizer("A Woman is playing the Xylophone, quietly!")["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids
    assert len(tiny_vocab()) < 200


@pytest.mark.parametrize("name, video_native, frames_per_clip",
                         [("git", True, 6), ("blip", False, 1), ("git_image", False, 1)])
def test_captioner_reads_the_models_frame_count(stages, name, video_native, frames_per_clip):
    captioner = stages[name].captioner
    assert captioner.video_native is video_native
    assert captioner.frames_per_clip == frames_per_clip
    assert captioner.device == torch.device("cpu") and captioner.dtype == torch.float32
    assert captioner.model_id.endswith(name)


def test_spread_indices_choose_and_repeat_evenly():
    assert spread_indices(12, 6).tolist() == [1, 3, 5, 7, 9, 11]
    assert spread_indices(2, 6).tolist() == [0, 0, 0, 1, 1, 1]
    assert spread_indices(1, 6).tolist() == [0] * 6
    assert spread_indices(7, 1).tolist() == [3]


@pytest.mark.parametrize("name", ["git", "blip"])
def test_stage_writes_one_video_caption_and_one_per_segment(stages, tiny_captioners, decoded_frames, name):
    task = make_task(decoded_frames, tiny_captioners[name])
    stages[name].run([task])
    assert not task.errors
    levels = [c.level for c in task.captions]
    assert levels == ["video", "segment", "segment", "segment"]
    video = task.captions[0]
    assert (video.segment_index, video.start_s, video.end_s) == (None, 0.0, TOTAL_FRAMES / FPS)
    for caption, segment in zip(task.captions[1:], task.segments):
        assert (caption.segment_index, caption.start_s, caption.end_s) == (
            segment.index, segment.start_s, segment.end_s)
    for caption in task.captions:
        assert isinstance(caption.text, str) and caption.text == caption.text.strip()
        # each generated token adds at most one word (## pieces join the previous one)
        assert len(caption.text.split()) <= MAX_NEW_TOKENS


@pytest.mark.parametrize("name", ["git", "blip"])
def test_video_caption_equals_the_models_own_on_the_same_frames(stages, tiny_captioners, decoded_frames, name):
    task = make_task(decoded_frames, tiny_captioners[name])
    stages[name].run([task])
    frames = list(decoded_frames)
    if name == "git":
        # 6 of the 12 sampled frames, spread: positions 1, 3, ..., 11
        expected = direct_caption(stages[name], frames[1::2], video=True)
    else:
        expected = direct_caption(stages[name], [frames[len(frames) // 2]], video=False)
    assert task.captions[0].text == expected
    # the check means something only if the tiny model's caption depends on the pixels
    blank = np.zeros_like(decoded_frames[:6])
    blank_caption = direct_caption(stages[name], list(blank) if name == "git" else [blank[0]], name == "git")
    assert blank_caption != expected


@pytest.mark.parametrize("name", ["git", "blip"])
def test_segment_captions_equal_the_models_own_on_each_segments_frames(stages, tiny_captioners, decoded_frames,
                                                                       name):
    task = make_task(decoded_frames, tiny_captioners[name])
    stages[name].run([task])
    # sampled positions of each segment: 0..2 (frames 0-10), 3..7 (15-35), 8..11 (40-55)
    for caption, positions in zip(task.captions[1:], ([0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11])):
        frames = [decoded_frames[p] for p in positions]
        if name == "git":
            # fewer sampled frames than the model's 6: each is repeated, evenly
            clip = [frames[i] for i in spread_indices(len(frames), 6)]
            expected = direct_caption(stages[name], clip, video=True)
        else:
            expected = direct_caption(stages[name], [frames[len(frames) // 2]], video=False)
        assert caption.text == expected, f"segment {caption.segment_index}"


def test_single_segment_video_gets_only_the_video_caption(stages, tiny_captioners, decoded_frames):
    task = make_task(decoded_frames, tiny_captioners["blip"], cuts=())
    stages["blip"].run([task])
    assert [(c.level, c.segment_index) for c in task.captions] == [("video", None)]


def test_max_segments_keeps_the_longest_in_video_order(tiny_captioners, decoded_frames):
    stage = CaptionStage(run_config(tiny_captioners["blip"], max_segments=2))
    task = make_task(decoded_frames, tiny_captioners["blip"])
    stage.run([task])
    assert [c.segment_index for c in task.captions] == [None, 1, 2]


def test_per_segment_off_gives_only_video_captions(tiny_captioners, decoded_frames):
    stage = CaptionStage(run_config(tiny_captioners["blip"], per_segment=False))
    task = make_task(decoded_frames, tiny_captioners["blip"])
    stage.run([task])
    assert [c.level for c in task.captions] == ["video"]


def test_batching_across_videos_gives_the_same_captions(stages, tiny_captioners, decoded_frames):
    stage = stages["git"]
    alone = make_task(decoded_frames, tiny_captioners["git"])
    stage.run([alone])
    # reversed frames make a second, different video; small generate batches force several chunks
    first = make_task(decoded_frames, tiny_captioners["git"], video_id="a")
    second = make_task(decoded_frames[::-1].copy(), tiny_captioners["git"], video_id="b")
    second_alone = copy.deepcopy(second)
    stage.run([second_alone])
    batched = copy.copy(stage)
    batched.clips_per_batch = 3
    batched.run([first, second])
    assert [c.text for c in first.captions] == [c.text for c in alone.captions]
    assert [c.text for c in second.captions] == [c.text for c in second_alone.captions]


def test_a_video_without_prepared_frames_is_an_error_row_not_a_failed_batch(stages, tiny_captioners,
                                                                           decoded_frames):
    good = make_task(decoded_frames, tiny_captioners["blip"], video_id="good")
    bad = make_task(decoded_frames, tiny_captioners["blip"], video_id="bad")
    bad.frames.prepared.clear()
    stages["blip"].run([good, bad])
    assert len(good.captions) == 4 and not good.errors
    assert not bad.captions and [e.stage for e in bad.errors] == ["captions"]


def test_captioner_honours_max_new_tokens_and_beams(tiny_captioners, decoded_frames):
    captioner = Captioner(ModelsConfig(captions=str(tiny_captioners["git"]), device="cpu"),
                          CaptionsConfig(max_new_tokens=2, num_beams=2))
    clip = FramePreparer(captioner.processor, "captions").prepare(decoded_frames)
    texts = captioner.caption([clip, clip[:3]])
    assert len(texts) == 2 and all(len(text.split()) <= 2 for text in texts)
    assert captioner.caption([]) == []


@pytest.mark.parametrize("name", ["git", "blip"])
def test_more_new_tokens_than_the_model_has_text_positions_are_refused_at_load(tiny_captioners, name):
    # each caption that ran that long failed its video with "index out of range in self", every run
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_captioners[name])
    positions = (getattr(config, "text_config", None) or config).max_position_embeddings
    models = ModelsConfig(captions=str(tiny_captioners[name]), device="cpu")
    with pytest.raises(ModelLoadError, match=rf"captions.max_new_tokens is {positions}, .* at most {positions - 1}"):
        Captioner(models, CaptionsConfig(max_new_tokens=positions))
    Captioner(models, CaptionsConfig(max_new_tokens=positions - 1))


@pytest.mark.parametrize("missing", ["vidlens-tests/no-such-captioner", "empty-folder"])
def test_missing_model_raises_model_load_error_naming_it(monkeypatch, tmp_path, missing):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the hub library reads the variable once at import; set its flag too so the test never waits on a network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if missing == "empty-folder":
        missing = str(tmp_path / "empty-folder")
        Path(missing).mkdir()
    with pytest.raises(ModelLoadError, match="captions model") as failure:
        Captioner(ModelsConfig(captions=missing, device="cpu"), CaptionsConfig())
    assert missing in str(failure.value)

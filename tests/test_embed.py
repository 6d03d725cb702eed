"""The embed stage and the video-text model, on tiny random CLIP, SigLIP and X-CLIP models.

The central check: the pipeline's embeddings equal what the same model gives when called
directly on the same decoded frames through its own processor, and the comparison is
sensitive to frame order and colour order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schemas.config import LabelsConfig, MatchConfig, ModelsConfig, ResourcesConfig, RunConfig
from workers.embed import EmbedStage, frame_spans, merge_spans
from workers.embedding import TextBank, VideoTextModel, even_positions
from workers.models import ModelLoadError, load_frame_preparers
from workers.synthetic import scene_frames, write_video
from workers.task import SampledFrames, Segment, VideoMeta, VideoRef, VideoTask
from workers.tiny_models import XCLIP_TINY_FRAMES, build_tiny_clip, build_tiny_siglip, build_tiny_xclip

KINDS = ("clip", "siglip", "xclip")
FPS = 8.0
#: the synthetic clip: 16 frames at 8 fps, a hard cut at frame 8; every other frame is sampled.
TOTAL, CUT, STEP = 16, 8, 2


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """Tiny models built once for the module: kind -> folder."""
    root = tmp_path_factory.mktemp("tiny_models")
    builders = {"clip": build_tiny_clip, "siglip": build_tiny_siglip, "xclip": build_tiny_xclip}
    return {kind: str(build(root / kind)) for kind, build in builders.items()}


@pytest.fixture(scope="module")
def decoded_frames(tmp_path_factory):
    """RGB frames of a synthetic two-scene clip, as decord decodes them: [16, H, W, 3]."""
    import decord

    path = write_video(tmp_path_factory.mktemp("clips") / "scenes.mp4",
                       scene_frames([CUT], TOTAL, width=96, height=64), fps=FPS)
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    assert len(reader) == TOTAL
    return reader.get_batch(list(range(TOTAL))).asnumpy()


def _config(folder: str, stages=("embed",), **sections) -> RunConfig:
    return RunConfig(
        stages=stages,
        models=ModelsConfig(embed=folder, device="cpu", dtype="float32"),
        resources=ResourcesConfig(executor="local", frames_per_batch=3),
        **sections,
    )


def _task(config: RunConfig, frames: np.ndarray, name: str = "clip") -> VideoTask:
    """A task as decode and sampling would leave it: every other frame, two segments."""
    preparer = load_frame_preparers(config)["embed"]
    indices = np.arange(0, TOTAL, STEP)
    height, width = frames.shape[1:3]
    return VideoTask(
        ref=VideoRef(uri=f"memory://{name}.mp4", size_bytes=1, mtime_ns=0, etag=None, video_id=name),
        meta=VideoMeta(duration_s=TOTAL / FPS, fps=FPS, frame_count=TOTAL, width=width, height=height,
                       codec="h264", rotation=0, has_audio=False, container="mp4", decoder="decord"),
        segments=[
            Segment(0, 0, CUT - 1, 0.0, CUT / FPS, 1.0, "transnetv2", CUT // 2),
            Segment(1, CUT, TOTAL - 1, CUT / FPS, TOTAL / FPS, 0.9, "transnetv2", (CUT + TOTAL) // 2),
        ],
        frames=SampledFrames(
            frame_index=indices.astype(np.int64),
            timestamp_s=indices / FPS,
            segment_index=(indices >= CUT).astype(np.int32),
            prepared={"embed": preparer.prepare(frames[indices])},
        ),
    )


def _reference(model, processor, kind: str, frames: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(frame embeddings or None, clip embedding) computed directly with the HF model and processor."""
    with torch.no_grad():
        if kind == "xclip":
            chosen = frames[even_reference(len(frames), XCLIP_TINY_FRAMES)]
            pixels = processor(videos=list(chosen), return_tensors="pt")["pixel_values"]
            video = model.get_video_features(pixel_values=pixels.reshape(1, XCLIP_TINY_FRAMES, *pixels.shape[-3:]))
            return None, F.normalize(video.pooler_output, dim=-1)[0].numpy()
        pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"]
        per_frame = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        return per_frame.numpy(), F.normalize(per_frame.mean(dim=0), dim=-1).numpy()


def even_reference(available: int, wanted: int) -> list[int]:
    """Frames the pipeline must give X-CLIP, spelled out: the centre frame of each equal bin."""
    if (available, wanted) == (8, 4):
        return [1, 3, 5, 7]
    if available == wanted:
        return list(range(wanted))
    raise AssertionError(f"no reference selection for {available} of {wanted}")


#: how close the pipeline's embeddings are to the model run on its own processor's output: the
#: pipeline resizes frames its own way (workers.preparation), within 2 levels of the processor's
#: pixels, which moves a tiny random model's unit embeddings by up to about 2e-4. BGR frames
#: and reversed clips move them by more than 1e-3 (checked below).
CLOSE = 5e-4


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_embeddings_equal_the_models_own(kind, model_folders, decoded_frames):
    from transformers import AutoModel, AutoProcessor

    config = _config(model_folders[kind])
    stage = EmbedStage(config)
    task = _task(config, decoded_frames)
    stage.run([task])
    assert not task.errors, task.errors

    model = AutoModel.from_pretrained(model_folders[kind]).eval()
    processor = AutoProcessor.from_pretrained(model_folders[kind])
    sampled = decoded_frames[task.frames.frame_index]
    frames_ref, video_ref = _reference(model, processor, kind, sampled)
    np.testing.assert_allclose(task.video_embedding, video_ref, atol=CLOSE)
    for segment in task.segments:
        _, segment_ref = _reference(model, processor, kind, sampled[task.frames.segment_index == segment.index])
        np.testing.assert_allclose(task.segment_embeddings[segment.index], segment_ref, atol=CLOSE)
    if frames_ref is not None:
        np.testing.assert_allclose(task.frame_embeddings, frames_ref, atol=CLOSE)
        # frame order: the per-frame rows must follow the sampled frames
        assert np.abs(task.frame_embeddings[::-1] - frames_ref).max() > 1e-3
    else:
        # X-CLIP's frame embedding is the frame seen as a still clip, before the video modules
        with torch.no_grad():
            still = processor(images=[sampled[0]] * XCLIP_TINY_FRAMES, return_tensors="pt")["pixel_values"]
            still = still.reshape(XCLIP_TINY_FRAMES, *still.shape[-3:])
            first = model.visual_projection(model.vision_model(pixel_values=still).pooler_output[0])
        np.testing.assert_allclose(task.frame_embeddings[0], F.normalize(first, dim=-1).numpy(), atol=CLOSE)

    # the comparison is sensitive: BGR frames, and (for X-CLIP) reversed frames, embed differently
    _, bgr = _reference(model, processor, kind, sampled[..., ::-1].copy())
    assert np.abs(bgr - task.video_embedding).max() > 1e-3
    if kind == "xclip":
        _, reversed_ref = _reference(model, processor, kind, sampled[::-1].copy())
        assert np.abs(reversed_ref - task.video_embedding).max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_labels_and_matches(kind, model_folders, decoded_frames):
    top_k = 2
    config = _config(
        model_folders[kind],
        stages=("embed", "objects", "scenes", "match"),
        labels=LabelsConfig(objects=("dog", "cat", "car", "tree"), scenes=("beach", "kitchen", "street"),
                            top_k=top_k, min_score=0.0),
        match=MatchConfig(queries=("a red room", "a green field", "people talking"), template="a video of {}"),
    )
    stage = EmbedStage(config)
    tasks = [_task(config, decoded_frames, "a"), _task(config, decoded_frames[::-1].copy(), "b")]
    stage.run(tasks)
    dim = stage.model.dim
    for task in tasks:
        assert not task.errors, task.errors
        assert task.frame_embeddings.shape == (TOTAL // STEP, dim) and task.frame_embeddings.dtype == np.float32
        assert task.segment_embeddings.shape == (2, dim) and task.video_embedding.shape == (dim,)
        np.testing.assert_allclose(np.linalg.norm(task.segment_embeddings, axis=1), 1.0, atol=1e-5)
        duration = task.meta.duration_s
        for label_kind, vocabulary in (("object", 4), ("scene", 3)):
            rows = [label for label in task.labels if label.kind == label_kind]
            assert len(rows) == 3 * top_k  # the video and two segments
            for level, segment_index in (("video", None), ("segment", 0), ("segment", 1)):
                group = [r for r in rows if r.level == level and r.segment_index == segment_index]
                assert [r.rank for r in group] == list(range(1, top_k + 1))
                assert [r.score for r in group] == sorted((r.score for r in group), reverse=True)
                assert all(0.0 <= r.score <= 1.0 and -1.0 <= r.similarity <= 1.0 for r in group)
                # with min_score 0 every frame's top labels hold: some label of the clip holds somewhere
                assert any(label.time_ranges for label in group)
                for label in group:
                    _assert_ranges_inside(label.time_ranges, 0.0, duration)
        assert len(task.matches) == 3 * 3
        for level, segment_index in (("video", None), ("segment", 0), ("segment", 1)):
            group = [m for m in task.matches if m.level == level and m.segment_index == segment_index]
            assert [m.query for m in group] == ["a red room", "a green field", "people talking"]
            assert all(0.0 <= m.probability <= 1.0 for m in group)
            if kind == "siglip":
                expected = 1 / (1 + np.exp(-(stage.model.logit_scale * np.array([m.similarity for m in group])
                                             + stage.model.logit_bias)))
                np.testing.assert_allclose([m.probability for m in group], expected, atol=1e-5)
            else:
                assert sum(m.probability for m in group) == pytest.approx(1.0, abs=1e-5)
        video_match = task.matches[0]
        assert (video_match.start_s, video_match.end_s) == (0.0, duration)

    # frames are batched across videos (3 per forward pass here); results match one video alone
    alone = _task(config, decoded_frames[::-1].copy(), "b")
    stage.run([alone])
    np.testing.assert_allclose(alone.frame_embeddings, tasks[1].frame_embeddings, atol=1e-5)
    np.testing.assert_allclose(alone.segment_embeddings, tasks[1].segment_embeddings, atol=1e-5)
    np.testing.assert_allclose([(m.similarity, m.probability) for m in alone.matches],
                               [(m.similarity, m.probability) for m in tasks[1].matches], atol=1e-5)


@pytest.mark.parametrize("kind", ("clip", "xclip"))
def test_a_segment_without_frames_gets_no_results_and_the_rest_get_theirs(kind, model_folders, decoded_frames):
    # guards against one frameless segment (a shot beyond sampling.max_frames) losing the whole video's results
    from pipeline.records import RunIdentity, task_rows

    config = _config(model_folders[kind], stages=("embed", "objects", "match"),
                     labels=LabelsConfig(objects=("dog", "cat"), top_k=1), match=MatchConfig(queries=("q",)))
    stage = EmbedStage(config)
    whole = _task(config, decoded_frames)
    stage.run([whole])
    # the last frame is a shot of its own, shorter than the sampling step: no sampled frame
    task = _task(config, decoded_frames)
    task.segments[1] = Segment(1, CUT, TOTAL - 2, CUT / FPS, (TOTAL - 1) / FPS, 0.9, "transnetv2", 12)
    task.segments.append(Segment(2, TOTAL - 1, TOTAL - 1, (TOTAL - 1) / FPS, TOTAL / FPS, 0.8, "transnetv2", 15))
    stage.run([task])
    assert not task.errors, task.errors
    np.testing.assert_allclose(task.video_embedding, whole.video_embedding, atol=1e-5)
    np.testing.assert_allclose(task.segment_embeddings[:2], whole.segment_embeddings, atol=1e-5)
    assert task.segment_embeddings.shape == (3, stage.model.dim) and np.isnan(task.segment_embeddings[2]).all()
    assert {(r.level, r.segment_index) for r in task.labels} == {("video", None), ("segment", 0), ("segment", 1)}
    assert {(m.level, m.segment_index) for m in task.matches} == {("video", None), ("segment", 0), ("segment", 1)}
    rows = task_rows(task, RunIdentity("run", "fingerprint", ""), config)
    assert [row["embedding"] is None for row in rows["segments"]] == [False, False, True]
    assert rows["videos"][0]["embedding"] is not None


def _assert_ranges_inside(ranges, start, end):
    previous_end = -1.0
    for range_start, range_end in ranges:
        assert start <= range_start < range_end <= end
        assert range_start > previous_end  # sorted and merged
        previous_end = range_end


def test_xclip_scores_are_the_models_own_logits(model_folders, decoded_frames):
    from transformers import AutoModel, AutoProcessor

    folder = model_folders["xclip"]
    model = VideoTextModel(ModelsConfig(embed=folder, device="cpu", dtype="float32"))
    frames = decoded_frames[: XCLIP_TINY_FRAMES]
    queries = ["a red room", "a green field"]
    clips = model.embed_clips(model.preparer.prepare(frames), None, [np.arange(len(frames))])
    similarity = model.clip_similarity(clips, model.text_bank(queries, ("{}",)))

    reference = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=queries, videos=list(frames), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = reference(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=inputs["pixel_values"].reshape(1, len(frames), *inputs["pixel_values"].shape[-3:]))
    np.testing.assert_allclose(similarity * model.logit_scale, logits.logits_per_video.numpy(), atol=1e-4)
    np.testing.assert_allclose(model.probabilities(similarity), logits.logits_per_video.softmax(-1).numpy(), atol=1e-5)


def test_siglip_texts_are_padded_to_full_length(model_folders):
    from transformers import AutoModel, AutoTokenizer

    folder = model_folders["siglip"]
    model = VideoTextModel(ModelsConfig(embed=folder, device="cpu", dtype="float32"))
    texts = ["a dog", "a cat on a mat"]
    reference = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        padded = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        assert padded["input_ids"].shape[1] == reference.config.text_config.max_position_embeddings
        full = F.normalize(reference.get_text_features(input_ids=padded["input_ids"]).pooler_output, dim=-1)
        short = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        shortest = F.normalize(reference.get_text_features(input_ids=short["input_ids"]).pooler_output, dim=-1)
    embedded = model.embed_texts(texts)
    np.testing.assert_allclose(embedded, full.numpy(), atol=1e-5)
    assert np.abs(embedded - shortest.numpy()).max() > 1e-3
    # any text encodes, accents and symbols included
    assert model.embed_texts(["Ünïcode ☃ 😀 — «quotes» 123"]).shape == (1, model.dim)


@pytest.mark.parametrize("kind", KINDS)
def test_a_text_longer_than_the_model_reads_is_named_in_a_warning(kind, model_folders, tmp_path, monkeypatch,
                                                                   caplog):
    """A label, template or query beyond the model's text positions was cut without a word,
    and scored as the shorter text it was cut to. It is still encoded, cut, with a warning."""
    models = ModelsConfig(embed=model_folders[kind], device="cpu", dtype="float32", text_cache=str(tmp_path))
    model = VideoTextModel(models)
    long = "a dog chasing a red ball along the beach at sunset " * 4
    count = len(model.tokenizer(long.strip(), verbose=False)["input_ids"])
    assert count > model.text_length
    caplog.set_level("WARNING", logger="workers.embedding")

    bank = model.text_bank(["a dog", long.strip()], ("{}",))
    [record] = caplog.records
    assert f"has {count} tokens" in record.message and f"reads at most {model.text_length}" in record.message
    assert "'a dog chasing a red ball along the beach ... " in record.message  # its start and end
    assert len(record.message) < 300 and "'a dog'" not in record.message
    model.text_bank([long.strip()], ("{}",))
    assert len(caplog.records) == 1  # once per text
    # cut, as before: the same embedding as a longer text that differs only past the cut
    longer = model.text_bank([long.strip() + " and a cat"], ("{}",))
    np.testing.assert_allclose(longer.embeddings[0], bank.embeddings[1], atol=1e-6)

    # read from the text cache, the bank was cut all the same
    caplog.clear()
    again = VideoTextModel(models)
    monkeypatch.setattr(again, "_text_features", lambda texts: pytest.fail(f"encoded again: {texts[:2]}"))
    again.text_bank(["a dog", long.strip()], ("{}",))
    assert len(caplog.records) == 1 and f"has {count} tokens" in caplog.records[0].message

    # labels and queries from the configuration: at the stage's load, template and all
    caplog.clear()
    config = _config(model_folders[kind], stages=("embed", "objects", "match"),
                     labels=LabelsConfig(objects=("dog", "cat"), object_templates=("a photo of a {}.", "{} " + long)),
                     match=MatchConfig(queries=("a cooking scene", long)))
    EmbedStage(config)
    said = [record.message for record in caplog.records]
    assert all(f"reads at most {model.text_length}" in message for message in said)
    assert sorted(message.split("'")[1].split()[0] for message in said) == ["a", "cat", "dog"]


def test_known_answer_labels_and_time_ranges(model_folders, decoded_frames):
    """With each label's text embedding set to one segment's embedding, the answer is known."""
    config = _config(model_folders["clip"], stages=("embed", "objects", "match"),
                     labels=LabelsConfig(objects=("x",), top_k=1, min_score=0.5),
                     match=MatchConfig(queries=("q",)))
    stage = EmbedStage(config)
    task = _task(config, decoded_frames)
    stage.run([task])
    first, second = task.segment_embeddings
    bank = TextBank(("red scene", "green scene"), ("{}",), np.stack([first, second]))
    stage.vocabularies = {"object": bank}
    stage.queries = bank
    task = _task(config, decoded_frames)  # the same video afresh: a stage drops the frames it has read
    stage.run([task])
    assert not task.errors, task.errors
    by_level = {(label.level, label.segment_index): label for label in task.labels}
    assert by_level[("segment", 0)].label == "red scene"
    assert by_level[("segment", 1)].label == "green scene"
    assert by_level[("segment", 0)].similarity == pytest.approx(1.0, abs=1e-5)
    assert by_level[("segment", 0)].time_ranges == [(0.0, CUT / FPS)]
    assert by_level[("segment", 1)].time_ranges == [(CUT / FPS, TOTAL / FPS)]
    video = by_level[("video", None)]
    expected = {"red scene": [(0.0, CUT / FPS)], "green scene": [(CUT / FPS, TOTAL / FPS)]}
    assert video.time_ranges == expected[video.label]
    best = {(m.level, m.segment_index): m for m in task.matches if m.probability > 0.5}
    assert best[("segment", 0)].query == "red scene" and best[("segment", 1)].query == "green scene"


def test_tiny_models_are_small(model_folders):
    for folder in model_folders.values():
        files = list(Path(folder).iterdir())
        assert any(path.suffix == ".safetensors" for path in files)
        assert sum(path.stat().st_size for path in files) < 2 * 1024**2


def test_frame_spans_and_merging():
    segments = [Segment(0, 0, 9, 0.0, 1.0, 1.0, "transnetv2", 5), Segment(1, 10, 29, 1.0, 3.0, 1.0, "transnetv2", 20)]
    spans = frame_spans(np.array([0.2, 0.6, 1.5, 2.5]), np.array([0, 0, 1, 1]), segments, 3.0)
    np.testing.assert_allclose(spans, [[0.0, 0.4], [0.4, 1.0], [1.0, 2.0], [2.0, 3.0]])
    assert merge_spans(spans[[0, 1, 3]]) == [(0.0, 1.0), (2.0, 3.0)]
    assert merge_spans(np.zeros((0, 2))) == []
    assert merge_spans(np.array([[3.0, 3.0]])) == []
    assert merge_spans(np.array([[1.0000001, 1.0000004], [0.0, 4e-7]])) == []  # (rounded inward, inside out)
    assert merge_spans(np.array([[0.3, 15.1666666667]])) == [(0.3, 15.166666)]
    # a single frame for the whole video (no segments) stands for all of it
    np.testing.assert_allclose(frame_spans(np.array([1.0]), np.array([0]), [], 4.0), [[0.0, 4.0]])
    assert even_positions(8, 4).tolist() == [1, 3, 5, 7]
    assert even_positions(2, 4).tolist() == [0, 0, 1, 1]
    assert even_positions(3, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("where", ["hub", "empty_folder"])
def test_unloadable_model_names_it_and_suggests_a_local_folder(where, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = "vidlens-tests/no-such-model" if where == "hub" else str(tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        VideoTextModel(ModelsConfig(embed=model_id, device="cpu"))
    message = str(caught.value)
    assert model_id in message
    if where == "hub":
        assert "models.embed" in message and "--local-dir" in message
    else:
        assert "folder" in message and "save_pretrained" in message


def test_a_model_load_error_names_the_flag_the_command_line_has():
    # "--captions-model" was suggested: `vidlens run` has --caption-model, and refused the other
    from pipeline.arguments import build_parser
    from workers.model_sources import explain_load_failure as _explain

    for role, flag in (("embed", "--embed-model"), ("captions", "--caption-model")):
        for model in ("./models/no-such-model", "org/no-such-model"):
            assert f"(or {flag}" in _explain(model, role, OSError("gone"))
        assert build_parser().parse_args(["run", "videos", "--out", "out", flag, "m"])  # (a flag it has)


def test_a_model_that_finds_no_memory_to_load_in_says_so(tiny_models, monkeypatch):
    """A model loaded out of memory (ulimit -v) was "the folder ... exists but does not hold a
    loadable model (it needs config.json and the weights ...)", which sent one to check a whole model."""
    import errno

    from transformers import AutoModel

    from workers.model_sources import explain_load_failure as _explain

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(AutoModel, "from_pretrained", no_memory)
    with pytest.raises(ModelLoadError) as caught:
        VideoTextModel(ModelsConfig(embed=tiny_models["embed"], device="cpu"))
    message = str(caught.value)
    assert "Fix: out of memory: give the job more memory (ulimit -v" in message, message
    assert "does not hold a loadable model" not in message
    assert "does not hold a loadable model" in _explain(tiny_models["embed"], "embed", OSError("gone"))
    # a MemoryError() says nothing: its name alone, not "MemoryError: . Fix"
    assert f"model {tiny_models['embed']!r}: MemoryError. Fix: out of memory" in _explain(tiny_models["embed"],
                                                                                          "embed", MemoryError())


@pytest.fixture
def hub_at(monkeypatch):
    """Online mode (whatever the test run sets), with the hub at a given endpoint that no check
    of this process has reached yet."""
    from huggingface_hub import constants

    from workers import model_sources

    def online(endpoint: str) -> None:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(model_sources, "_HUB_ANSWERED", set())

    return online


def test_missing_hub_model_fails_at_once_when_the_hub_cannot_be_reached(tmp_path, model_folders, monkeypatch,
                                                                        hub_at):
    """Offline, without HF_HUB_OFFLINE, the hub client retried each file for about 25 s: a run took
    146 s to say its model was missing. A model in the cache still loads without the hub."""
    import shutil
    import socket

    from workers import model_sources, models

    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    hub_at(f"http://127.0.0.1:{closed}")

    class NeverCalled:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            raise AssertionError("the hub client was asked (and would retry) for a model it cannot get")

    config = ModelsConfig(embed="vidlens-tests/no-such-model", cache_dir=str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError) as caught:
        models.load_pretrained(NeverCalled, config.embed, config, "embed")
    message = str(caught.value)
    assert "'vidlens-tests/no-such-model'" in message and "HubUnreachable" in message
    assert f"hub (http://127.0.0.1:{closed}) cannot be reached" in message and str(tmp_path / "hub") in message
    assert "--local-dir" in message and "models.embed" in message

    # the same id, once in the cache (as a download leaves it), is not checked against the hub
    repo = tmp_path / "hub" / "models--vidlens-tests--no-such-model"
    shutil.copytree(model_folders["clip"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    calls = []
    monkeypatch.setattr("huggingface_hub.utils.get_session", lambda: calls.append(1))
    model_sources.check_hub_reachable(config.embed, None, config)
    assert calls == []


def test_a_cached_hub_model_records_its_commit_and_keeps_its_label_banks(tmp_path, model_folders, monkeypatch):
    """transformers 5 no longer sets `config._commit_hash`: a hub model's revision went into the
    runs table as null, and its label banks were never kept (their key is the commit), so every
    run of the default model encoded its vocabularies again."""
    import shutil

    from pipeline.preflight import preflight

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--vidlens-tests--tiny-clip"
    shutil.copytree(model_folders["clip"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder = tmp_path / "banks"
    models = ModelsConfig(embed="vidlens-tests/tiny-clip", cache_dir=str(tmp_path / "hub"), device="cpu",
                          text_cache=str(folder))
    model = VideoTextModel(models)
    assert model.revision == commit
    names, templates = ("cat", "dog"), ("a photo of a {}.",)
    bank = model.text_bank(names, templates)
    assert len(list(folder.glob("*.npz"))) == 1

    def encoded_again(texts):
        raise AssertionError(f"encoded again: {texts[:2]}")

    again = VideoTextModel(models)
    monkeypatch.setattr(again, "_text_features", encoded_again)
    np.testing.assert_array_equal(again.text_bank(names, templates).embeddings, bank.embeddings)

    records, _ = preflight(RunConfig(stages=("embed",), models=models))
    assert [(r["model_id"], r["revision"]) for r in records] == [("vidlens-tests/tiny-clip", commit)]


def test_a_hub_that_answers_is_asked_once_per_process(tmp_path, hub_at):
    import http.server
    import threading

    from workers import model_sources

    asked = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # any status counts as an answer
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub_at(f"http://127.0.0.1:{server.server_port}")
        config = ModelsConfig(embed="vidlens-tests/not-cached", cache_dir=str(tmp_path))
        for _ in range(3):  # a model, its processor, its config: the hub's client reports what is missing
            model_sources.check_hub_reachable(config.embed, None, config)
        assert asked == ["/"]
    finally:
        server.shutdown()


def test_non_video_text_model_is_refused(tmp_path, model_folders):
    import shutil

    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                         vocab_size=10)).save_pretrained(tmp_path)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_folders['clip']}/{name}", tmp_path / name)
    with pytest.raises(ModelLoadError, match="bert.*CLIP, SigLIP"):
        VideoTextModel(ModelsConfig(embed=str(tmp_path), device="cpu"))


@pytest.mark.parametrize("kind", KINDS)
def test_label_banks_are_kept_on_disk_and_read_back_by_the_next_run(kind, model_folders, tmp_path, monkeypatch):
    """A nightly run reads the encoded vocabulary from disk instead of encoding it again."""
    import shutil

    names, templates = ("cat", "dog", "kitchen"), ("a photo of a {}.", "a {} in a video")
    folder = tmp_path / "banks"
    models = ModelsConfig(embed=model_folders[kind], device="cpu", text_cache=str(folder))
    bank = VideoTextModel(models).text_bank(names, templates)
    assert len(list(folder.glob("*.npz"))) == 1

    def encoded_again(texts):
        raise AssertionError(f"encoded again: {texts[:2]}")

    again_model = VideoTextModel(models)
    monkeypatch.setattr(again_model, "_text_features", encoded_again)
    again = again_model.text_bank(names, templates)
    np.testing.assert_array_equal(again.embeddings, bank.embeddings)
    assert again.names == bank.names
    if kind == "xclip":  # the raw features the prompt generator conditions on come back too
        torch.testing.assert_close(again.raw, bank.raw)
        probe = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 4, bank.raw.shape[1]))).to(bank.raw.dtype)
        with torch.inference_mode():
            np.testing.assert_array_equal(again_model._conditioned_texts(probe, again),
                                          again_model._conditioned_texts(probe, bank))
    else:
        assert again.raw is None

    # other texts, other weights (a re-saved folder), or the cache off: encoded, never a stale bank
    with pytest.raises(AssertionError, match="encoded again"):
        again_model.text_bank(names[:2], templates)
    copy = tmp_path / "copy"
    shutil.copytree(model_folders[kind], copy)
    resaved = ModelsConfig(embed=str(copy), device="cpu", text_cache=str(folder))
    other = VideoTextModel(resaved)
    monkeypatch.setattr(other, "_text_features", encoded_again)
    with pytest.raises(AssertionError, match="encoded again"):
        other.text_bank(names, templates)
    off = VideoTextModel(ModelsConfig(embed=model_folders[kind], device="cpu", text_cache="off"))
    monkeypatch.setattr(off, "_text_features", encoded_again)
    with pytest.raises(AssertionError, match="encoded again"):
        off.text_bank(names, templates)


def test_a_changed_file_in_a_model_folders_subfolder_is_another_model(model_folders, tmp_path, monkeypatch):
    """Only the folder's own files were keyed: a tokenizer or weights file re-saved in a subfolder
    read the banks its old version had encoded."""
    import json
    import os
    import shutil

    from workers.text_cache import model_fingerprint

    folder = tmp_path / "clip"
    shutil.copytree(model_folders["clip"], folder)
    flat = model_fingerprint(str(folder), None)
    (folder / "text" / "nested").mkdir(parents=True)
    (folder / "text" / "nested" / "vocab.json").write_text('{"a": 0}')
    (folder / ".git").mkdir()
    (folder / ".git" / "index").write_text("1")
    nested = model_fingerprint(str(folder), None)
    assert '"text/nested/vocab.json"' in nested and ".git" not in nested
    # the folder's own files keyed as before: the banks of a folder without subfolders are still found
    assert [entry for entry in json.loads(nested) if "/" not in entry[0]] == json.loads(flat)

    names, templates = ("cat", "dog"), ("a photo of a {}.",)
    models = ModelsConfig(embed=str(folder), device="cpu", text_cache=str(tmp_path / "banks"))
    VideoTextModel(models).text_bank(names, templates)

    def encoded_again(texts):
        raise AssertionError(f"encoded again: {texts[:2]}")

    (folder / ".git" / "index").write_text("22")  # (git status rewrites it; the weights are the same)
    unchanged = VideoTextModel(models)
    monkeypatch.setattr(unchanged, "_text_features", encoded_again)
    unchanged.text_bank(names, templates)
    stat = (folder / "text" / "nested" / "vocab.json").stat()
    for change in ("size", "mtime"):
        if change == "size":
            (folder / "text" / "nested" / "vocab.json").write_text('{"b": 0}\n')
        else:
            os.utime(folder / "text" / "nested" / "vocab.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        changed = VideoTextModel(models)
        monkeypatch.setattr(changed, "_text_features", encoded_again)
        with pytest.raises(AssertionError, match="encoded again"):
            changed.text_bank(names, templates)


def test_banks_of_the_same_prompts_in_other_shapes_are_kept_apart(model_folders, tmp_path):
    # guards against 1 name x 2 templates and 2 names x 1 template (the same prompts) sharing one cached bank
    folder = tmp_path / "banks"
    models = ModelsConfig(embed=model_folders["clip"], device="cpu", text_cache=str(folder))
    templates = ("a photo of a {}.", "a video frame showing a {}.")
    queries = ("a photo of a dog.", "a video frame showing a dog.")
    labels = VideoTextModel(models).text_bank(("dog",), templates)
    bank = VideoTextModel(models).text_bank(queries, ("{}",))
    assert labels.embeddings.shape[0] == 1 and bank.embeddings.shape == (2, labels.embeddings.shape[1])
    assert np.abs(bank.embeddings[0] - bank.embeddings[1]).max() > 1e-3
    assert len(list(folder.glob("*.npz"))) == 2
    # a stored bank whose rows do not fit its names (a file of another layout) is encoded again
    for stored in folder.glob("*.npz"):
        np.savez(stored, embeddings=labels.embeddings)
    again = VideoTextModel(models).text_bank(queries, ("{}",))
    np.testing.assert_allclose(again.embeddings, bank.embeddings, atol=1e-6)


def test_an_unreadable_or_unwritable_text_cache_never_stops_a_run(model_folders, tmp_path, caplog):
    names, templates = ("cat", "dog"), ("a {}",)
    folder = tmp_path / "banks"
    models = ModelsConfig(embed=model_folders["clip"], device="cpu", text_cache=str(folder))
    expected = VideoTextModel(models).text_bank(names, templates).embeddings
    [stored] = folder.glob("*.npz")
    whole = stored.read_bytes()
    # junk, an empty file (a crash after the rename: EOFError) and a cut one (BadZipFile) alike
    for damaged in (b"not a numpy file", b"", whole[: len(whole) // 2]):
        stored.write_bytes(damaged)
        caplog.clear()
        np.testing.assert_allclose(VideoTextModel(models).text_bank(names, templates).embeddings, expected, atol=1e-6)
        assert "unreadable text bank" in caplog.text
        assert np.load(stored)["embeddings"].shape == expected.shape  # written again, whole

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    unwritable = ModelsConfig(embed=model_folders["clip"], device="cpu", text_cache=str(blocked / "banks"))
    np.testing.assert_allclose(VideoTextModel(unwritable).text_bank(names, templates).embeddings, expected, atol=1e-6)
    assert "cannot keep the text bank" in caplog.text


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_probability_scale_and_bias_are_the_checkpoints_in_any_dtype(model_folders, tmp_path, kind):
    """Read after the model was cast to bf16, CLIP ViT-B/32's exp(logit_scale) of 100 was 98.86
    (SigLIP-base's bias -12.93 read -12.9375): every probability shifted, whatever the frames."""
    import shutil

    from transformers import AutoModel

    folder = tmp_path / kind
    shutil.copytree(model_folders[kind], folder)
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(100.0)) if kind == "clip" else 4.765)
        if kind == "siglip":
            model.logit_bias.fill_(-12.93)
    model.save_pretrained(folder)
    exact = [VideoTextModel(ModelsConfig(embed=str(folder), device="cpu", dtype=dtype, text_cache="off"))
             for dtype in ("float32", "bfloat16")]
    assert exact[1].dtype == torch.bfloat16
    assert exact[1].logit_scale == pytest.approx(exact[0].logit_scale, rel=1e-6)
    assert exact[0].logit_scale == pytest.approx(100.0 if kind == "clip" else float(np.exp(4.765)), rel=1e-5)
    assert exact[1].logit_bias == pytest.approx(exact[0].logit_bias, abs=1e-6)

"""Text search: a known answer by construction, the match stage's encoding, and refusals.

The known answer: after a run over three single-colour clips, the tiny CLIP's text
projection is changed (a rank-one update, the image tower untouched) so that the query
"a red scene", read through the run's match template, maps exactly onto the stored
embedding of the red clip. Search must then rank the red clip first with a cosine of 1.
"""

import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from pipeline import results
from pipeline.cli import main
from pipeline.job import run_job
from pipeline.search import EmbeddingSource, SearchError, encode_query, embedding_source
from schemas.config import ModelsConfig, RunConfig
from workers.synthetic import write_video

QUERY = "a red scene"
TEMPLATE = "a video of {}."
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def _clip(path, colour, frames=12):
    write_video(path, [np.full((48, 64, 3), colour, np.uint8) for _ in range(frames)], fps=12)


def _config(model: str) -> RunConfig:
    return RunConfig.from_dict({
        "stages": ["embed", "match"],
        "models": {"embed": model, "dtype": "float32"},  # as search encodes its query
        "match": {"queries": ["anything"], "template": TEMPLATE},
        "sampling": {"num_frames": 3},
        "output": {"thumbnails": False},
        "resources": {"executor": "local", "videos_per_batch": 3},
    })


def _point_query_at(model_folder: str, text: str, template: str, target: np.ndarray) -> None:
    """Change the text projection so that `text` in `template` encodes to exactly `target`."""
    from transformers import CLIPModel

    from workers.embedding import VideoTextModel

    encoder = VideoTextModel(ModelsConfig(embed=model_folder, device="cpu", dtype="float32"))
    captured = {}
    hook = encoder.model.text_projection.register_forward_hook(
        lambda module, inputs, output: captured.setdefault("pooled", inputs[0].detach()[0].double()))
    encoder.text_bank([text], (template,))  # the product's own tokenisation and pooling
    hook.remove()
    pooled = captured["pooled"]
    model = CLIPModel.from_pretrained(model_folder)
    weight = model.text_projection.weight.data.double()  # [projection, hidden]
    wanted = torch.from_numpy(target).double() * (weight @ pooled).norm()
    weight += torch.outer(wanted - weight @ pooled, pooled) / (pooled @ pooled)
    model.text_projection.weight.data = weight.float()
    model.save_pretrained(model_folder, safe_serialization=True)


@pytest.fixture(scope="module")
def coloured(tmp_path_factory, tiny_models):
    """One run over red, green and blue clips; then the model is made to read QUERY as the red clip."""
    root = tmp_path_factory.mktemp("search")
    model = str(root / "clip")
    shutil.copytree(tiny_models["embed"], model)
    videos = root / "videos"
    videos.mkdir()
    for name, colour in COLOURS.items():
        _clip(videos / f"{name}.mp4", colour)
    out = root / "out"
    here = os.getcwd()
    os.chdir(root)  # the model given as a relative folder: recorded by its absolute path, for search from anywhere
    try:
        summary = run_job(str(videos), str(out), _config("clip"), progress=False)
    finally:
        os.chdir(here)
    assert summary.exit_code == 0
    with results.open(str(out)) as r:
        stored = r.df("videos")
    red = stored[stored.uri.str.endswith("red.mp4")].embedding.iloc[0]
    _point_query_at(model, QUERY, TEMPLATE, np.asarray(red, dtype=np.float64))
    return {"root": root, "out": str(out), "model": model, "videos": videos}


def test_the_red_clip_ranks_first_by_construction(coloured):
    with results.open(coloured["out"]) as r:
        found = r.search(QUERY, top=3)
        segments = r.search(QUERY, top=3, level="segment")
    assert list(found["rank"]) == [1, 2, 3]
    assert found.uri.iloc[0].endswith("red.mp4")
    assert found.score.iloc[0] == pytest.approx(1.0, abs=1e-4)
    assert found.score.iloc[1] < found.score.iloc[0] - 1e-3
    assert segments.uri.iloc[0].endswith("red.mp4") and segments.segment_index.iloc[0] == 0
    assert segments.score.iloc[0] == pytest.approx(1.0, abs=1e-4)


def test_a_model_folder_is_recorded_by_its_absolute_path_a_hub_id_as_given(tmp_path, monkeypatch):
    from pipeline.preflight import recorded_model_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "git").mkdir(parents=True)
    # in runs.models and in captions.model alike: one model run from two folders is one value
    assert recorded_model_id("./models/git") == recorded_model_id(str(tmp_path / "models" / "git")) == \
        str(tmp_path / "models" / "git")
    assert recorded_model_id("microsoft/git-base-vatex") == "microsoft/git-base-vatex"


def test_the_query_is_encoded_exactly_as_the_match_stage_encodes_it(coloured):
    from workers.embed import EmbedStage

    with results.open(coloured["out"]) as r:
        source = embedding_source(r.con)
        config_json = r.sql("SELECT config_json FROM runs").fetchall()[0][0]
    assert source.template == TEMPLATE and source.model_id == coloured["model"]
    # (the configuration keeps the model folder as given: relative to where the run ran)
    recorded = RunConfig.from_dict(json.loads(config_json)).with_overrides(
        {"match.queries": [QUERY], "models.embed": coloured["model"]})
    stage = EmbedStage(recorded)
    np.testing.assert_allclose(encode_query(source, QUERY), stage.queries.embeddings[0], atol=1e-6)


def test_the_text_is_stripped_as_the_match_stage_strips_its_queries(coloured, monkeypatch):
    """A tokenizer that reads spaces (SigLIP's) encoded "a photo of {}." with "car " as another text."""
    import pipeline.search as search_module

    encoded = []
    encode = search_module.encode_query
    monkeypatch.setattr(search_module, "encode_query", lambda source, text, *args: encoded.append(text) or encode(
        source, text, *args))
    with results.open(coloured["out"]) as r:
        r.search(f" {QUERY}\n", top=1)
    assert encoded == [QUERY]


def test_a_template_changed_since_the_embeddings_is_the_one_search_uses(coloured, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(coloured["out"], out)
    monkeypatch.chdir(coloured["root"])  # the model as the run named it
    config = _config("clip").with_overrides({"match.template": "a video of {}"})
    rerun = run_job(str(coloured["videos"]), str(out), config, progress=False)
    assert rerun.reasons == {"config changed: matches": 3}  # the embeddings are kept
    with results.open(str(out)) as r:
        assert embedding_source(r.con).template == "a video of {}"
        found = r.search("anything", top=3)
        stored = r.sql("SELECT v.uri, m.similarity FROM matches m JOIN videos v USING (video_id) "
                       "WHERE m.level = 'video'").fetchall()
    for uri, similarity in stored:
        assert found[found.uri == uri].score.iloc[0] == pytest.approx(similarity, abs=1e-5)


def test_the_command_prints_the_ranking(coloured, capsys):
    assert main(["search", coloured["out"], QUERY, "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "red.mp4" in lines[0] and "1.000" in lines[0]


def test_a_query_longer_than_the_model_reads_is_searched_with_a_warning(coloured, capsys, caplog):
    """The query, in the match template, past the model's text positions was cut without a word:
    its scores were those of a shorter text. It is still searched, and the warning names it."""
    caplog.set_level("WARNING", logger="workers.embedding")
    long = " and ".join(["a red scene with a dog chasing a ball along the beach at sunset"] * 3)
    assert main(["search", coloured["out"], long, "--top", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    [said] = [record.message for record in caplog.records if record.name == "workers.embedding"]
    assert said.startswith("the text 'a video of a red scene with a dog chasin ... ") and "at sunset.'" in said
    assert "reads at most 77" in said


def test_another_model_is_refused(coloured, tmp_path, capsys):
    from workers.tiny_models import build_tiny_siglip

    other = str(build_tiny_siglip(tmp_path / "siglip"))
    with results.open(coloured["out"]) as r, pytest.raises(SearchError, match="another model"):
        r.search(QUERY, model=other)
    assert main(["search", coloured["out"], QUERY, "--model", other]) == 2
    assert "another model" in capsys.readouterr().err


def test_a_local_copy_named_like_the_recorded_model_is_accepted(coloured, tmp_path):
    with results.open(coloured["out"]) as r:
        source = embedding_source(r.con)
    copy = tmp_path / "models" / "clip-vit-base-patch32"
    shutil.copytree(coloured["model"], copy)
    hub = EmbeddingSource("openai/clip-vit-base-patch32", "abc123", source.embedding_dim, TEMPLATE,
                          False, None, source.run_ids)
    np.testing.assert_allclose(encode_query(hub, QUERY, model=str(copy)), encode_query(source, QUERY), atol=1e-6)
    with pytest.raises(SearchError, match="another model"):
        encode_query(hub, QUERY, model=coloured["model"])  # a folder with another name


def test_a_local_copy_whose_path_is_mistyped_is_said_to_be_no_folder(tmp_path, capsys):
    # it was "another model ... give a local copy (a folder named 'clip-vit-base-patch32')": the name given
    from pipeline.search import check_model

    hub = EmbeddingSource("openai/clip-vit-base-patch32", "abc123", 512, TEMPLATE, False, None, ("r",))
    typo = str(tmp_path / "modles" / "clip-vit-base-patch32")
    with pytest.raises(SearchError) as refused:
        check_model(hub, typo)
    assert str(refused.value) == (f"--model {typo!r} is no folder on this machine (check the path): give the folder "
                                  "a copy of 'openai/clip-vit-base-patch32' is in")
    with pytest.raises(SearchError, match="another model"):
        check_model(hub, str(tmp_path / "other-model"))  # another name: another model, as before


def test_a_copy_of_a_recorded_folder_that_is_here_asks_to_drop_the_model(coloured, tmp_path):
    # the refusal used to ask for "a local copy (a folder named ...)": what had been given
    with results.open(coloured["out"]) as r:
        source = embedding_source(r.con)
    copy = tmp_path / "copies" / Path(coloured["model"]).name
    shutil.copytree(coloured["model"], copy)
    with pytest.raises(SearchError, match="drop --model") as refused:
        encode_query(source, QUERY, model=str(copy))
    assert coloured["model"] in str(refused.value) and "local copy" not in str(refused.value)
    # a hub id is no folder: it was called "another folder"
    with pytest.raises(SearchError, match="drop --model") as refused:
        encode_query(source, QUERY, model="openai/clip-vit-base-patch32")
    assert "--model 'openai/clip-vit-base-patch32' is another model" in str(refused.value)
    assert "another folder" not in str(refused.value)


def test_a_wrong_embedding_size_is_refused(coloured):
    with results.open(coloured["out"]) as r:
        source = embedding_source(r.con)
    wrong = EmbeddingSource(source.model_id, source.revision, source.embedding_dim + 1, TEMPLATE,
                            False, None, source.run_ids)
    with pytest.raises(SearchError, match="not the model that made them"):
        encode_query(wrong, QUERY)


def test_outputs_from_two_models_are_refused(coloured, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(coloured["out"], out)
    second = tmp_path / "second-clip"
    shutil.copytree(coloured["model"], second)
    extra = tmp_path / "more"
    extra.mkdir()
    _clip(extra / "white.mp4", (240, 240, 240))
    run_job(str(extra), str(out), _config(str(second)), progress=False)
    with results.open(str(out)) as r:
        assert r.sql("SELECT count(DISTINCT run_id) FROM videos").fetchall()[0][0] == 2
        with pytest.raises(SearchError, match="different models.*forget OUT --missing"):
            r.search(QUERY)


def test_a_run_that_made_no_embeddings_leaves_the_output_searchable(coloured, tmp_path):
    # a run without the embed stage (shots only, here over a new clip) has its own default model
    # recorded: counted among the embeddings' runs, it made two models of one
    out = tmp_path / "shots-too"
    shutil.copytree(coloured["out"], out)
    extra = tmp_path / "more"
    extra.mkdir()
    _clip(extra / "white.mp4", (240, 240, 240))
    shots_only = RunConfig.from_dict({"stages": ["shots"], "output": {"thumbnails": False},
                                      "resources": {"executor": "local"}})
    assert run_job(str(extra), str(out), shots_only, progress=False).exit_code == 0
    with results.open(str(out)) as r:
        assert r.sql("SELECT count(DISTINCT run_id), count(embedding) FROM videos").fetchall() == [(2, 3)]
        assert r.search(QUERY, top=1).uri.iloc[0].endswith("red.mp4")


def test_an_output_whose_videos_were_all_forgotten_has_nothing_to_search(coloured, tmp_path):
    from pipeline.forget import forget

    out = tmp_path / "forgotten"
    shutil.copytree(coloured["out"], out)
    forget(str(out), [str(p) for p in coloured["videos"].iterdir()])
    with results.open(str(out)) as r:
        with pytest.raises(SearchError) as refused:
            r.search(QUERY)
    # (it said no more than that: not what to do)
    assert str(refused.value) == ("nothing to search: the output's videos table is empty (it holds no video that was "
                                  "processed: run `vidlens run SOURCE --out OUT` over the videos first; any that "
                                  "failed are in its errors table, with why)")


def test_a_run_killed_before_it_recorded_an_embedding_size_is_the_same_model():
    # a run killed after a first batch without embeddings (a texts-only rerun, a failed video)
    # opened its runs row with no embedding size; its later batches stored embeddings
    con = duckdb.connect()
    con.execute("CREATE TABLE videos AS SELECT * FROM (VALUES ('a', 'r1', [1.0, 0.0]::FLOAT[2]), "
                "('b', 'r2', [0.0, 1.0]::FLOAT[2])) t(video_id, run_id, embedding)")
    con.execute("CREATE TABLE matches (video_id VARCHAR, run_id VARCHAR)")
    con.execute("CREATE TABLE runs AS SELECT * FROM (VALUES "
                "('r1', '{}', [{'role': 'embed', 'model_id': 'm', 'revision': 'local', 'embedding_dim': NULL::INT}]), "
                "('r2', '{}', [{'role': 'embed', 'model_id': 'm', 'revision': 'local', 'embedding_dim': 2}])"
                ") t(run_id, config_json, models)")
    source = embedding_source(con)
    assert (source.model_id, source.embedding_dim, source.run_ids) == ("m", 2, ("r1", "r2"))
    con.execute("UPDATE runs SET models = [{'role': 'embed', 'model_id': 'm', 'revision': 'local', "
                "'embedding_dim': 3}] WHERE run_id = 'r1'")
    with pytest.raises(SearchError, match=r"different models.*m \(revision local, 2/3 dims\)"):
        embedding_source(con)


def test_runs_that_left_a_hub_models_commit_unrecorded_are_the_same_model():
    # under transformers 5 a hub model's commit was recorded as null until 2026-12-05: those runs
    # and the runs that record it are one model; two commits are still two models
    con = duckdb.connect()
    con.execute("CREATE TABLE videos AS SELECT * FROM (VALUES ('a', 'r1', [1.0, 0.0]::FLOAT[2]), "
                "('b', 'r2', [0.0, 1.0]::FLOAT[2])) t(video_id, run_id, embedding)")
    con.execute("CREATE TABLE matches (video_id VARCHAR, run_id VARCHAR)")
    con.execute("CREATE TABLE runs AS SELECT * FROM (VALUES "
                "('r1', '{}', [{'role': 'embed', 'model_id': 'org/m', 'revision': NULL::VARCHAR, 'embedding_dim': 2}]), "
                "('r2', '{}', [{'role': 'embed', 'model_id': 'org/m', 'revision': 'c1', 'embedding_dim': 2}])"
                ") t(run_id, config_json, models)")
    source = embedding_source(con)
    assert (source.model_id, source.revision, source.run_ids) == ("org/m", "c1", ("r1", "r2"))
    con.execute("UPDATE runs SET models = [{'role': 'embed', 'model_id': 'org/m', 'revision': 'c0', "
                "'embedding_dim': 2}] WHERE run_id = 'r1'")
    with pytest.raises(SearchError, match="different models"):
        embedding_source(con)


def test_a_run_killed_before_runs_rows_were_opened_is_its_configurations_model():
    # until 2026-12-04 a run wrote its runs row at its end only: r2, killed after a batch, left
    # embeddings no row describes, and the runs after it skip those videos. Its rows' configuration
    # fingerprint is r1's (the night before), whose row names the model; r3's is no recorded run's
    con = duckdb.connect()
    con.execute("CREATE TABLE videos AS SELECT * FROM (VALUES ('a', 'r1', 'f1', [1.0, 0.0]::FLOAT[2]), "
                "('b', 'r2', 'f1', [0.0, 1.0]::FLOAT[2])) t(video_id, run_id, config_fingerprint, embedding)")
    con.execute("CREATE TABLE matches (video_id VARCHAR, run_id VARCHAR)")
    con.execute("CREATE TABLE runs AS SELECT * FROM (VALUES ('r1', 'f1', '{}', "
                "[{'role': 'embed', 'model_id': 'm', 'revision': 'local', 'embedding_dim': 2}])"
                ") t(run_id, config_fingerprint, config_json, models)")
    source = embedding_source(con)
    assert (source.model_id, source.embedding_dim, source.run_ids) == ("m", 2, ("r1", "r2"))
    con.execute("INSERT INTO videos VALUES ('c', 'r3', 'f3', [0.5, 0.5]::FLOAT[2])")
    with pytest.raises(SearchError, match=r"no row for run\(s\) r3 .* no recorded run has its configuration.*"
                                          r"vidlens run --full.*SELECT uri FROM videos WHERE run_id IN \('r3'\)"):
        embedding_source(con)


def test_a_run_killed_before_runs_rows_were_opened_is_the_model_of_its_configurations_run_before_it():
    """(mutation review) The runs of one configuration may record different commits of its hub model (a
    run after the hub's update): a run that left no row ran the commit of the nearest such run before it,
    not of the first one; one before them all, the first's."""
    con = duckdb.connect()
    con.execute("CREATE TABLE videos AS SELECT * FROM (VALUES ('b', 'r2', 'f1', [0.0, 1.0]::FLOAT[2]), "
                "('c', 'r3', 'f1', [1.0, 1.0]::FLOAT[2])) t(video_id, run_id, config_fingerprint, embedding)")
    con.execute("CREATE TABLE matches (video_id VARCHAR, run_id VARCHAR)")
    con.execute("CREATE TABLE runs AS SELECT * FROM (VALUES "
                "('r1', 'f1', '{}', [{'role': 'embed', 'model_id': 'm', 'revision': 'aaa', 'embedding_dim': 2}]), "
                "('r2', 'f1', '{}', [{'role': 'embed', 'model_id': 'm', 'revision': 'bbb', 'embedding_dim': 2}])"
                ") t(run_id, config_fingerprint, config_json, models)")
    source = embedding_source(con)  # r3, killed after r2's update: bbb
    assert (source.model_id, source.revision, source.run_ids) == ("m", "bbb", ("r2", "r3"))
    con.execute("DELETE FROM videos WHERE run_id = 'r2'")
    con.execute("INSERT INTO videos VALUES ('a', 'r0', 'f1', [1.0, 0.0]::FLOAT[2])")
    con.execute("UPDATE runs SET run_id = 'r4' WHERE run_id = 'r2'")  # r0 before every recorded run: r1's
    source = embedding_source(con)
    assert (source.revision, source.run_ids) == ("aaa", ("r0", "r3")), source


def test_the_template_is_that_of_the_newest_run_whose_matches_are_current():
    # r1 made the embeddings and matched a's; r2 matched b's with another template; r3, the
    # newest run, matched nothing: its template is no current match's
    con = duckdb.connect()
    con.execute("CREATE TABLE videos AS SELECT * FROM (VALUES ('a', 'r1', [1.0, 0.0]::FLOAT[2]), "
                "('b', 'r1', [0.0, 1.0]::FLOAT[2])) t(video_id, run_id, embedding)")
    con.execute("CREATE TABLE matches AS SELECT * FROM (VALUES ('a', 'r1'), ('b', 'r2')) t(video_id, run_id)")
    model = "[{'role': 'embed', 'model_id': 'm', 'revision': 'local', 'embedding_dim': 2}]"
    con.execute("CREATE TABLE runs AS SELECT * FROM (VALUES "
                f"""('r1', '{{"match": {{"template": "a photo of {{}}."}}}}', {model}), """
                f"""('r2', '{{"match": {{"template": "a video of {{}}"}}}}', {model}), """
                f"""('r3', '{{"match": {{"template": "{{}}"}}}}', {model})) t(run_id, config_json, models)""")
    assert embedding_source(con).template == "a video of {}"


def test_nan_or_zero_embeddings_rank_last():
    # their cosine is NaN, which DuckDB sorts above 1.0: a broken embedding ranked first
    from pipeline.search import rank

    con = duckdb.connect()
    con.execute("CREATE TABLE videos AS SELECT * FROM (VALUES "
                "('nan', 'a.mp4', 1.0, ['nan'::FLOAT, 'nan'::FLOAT]::FLOAT[2]), "
                "('zero', 'b.mp4', 1.0, [0.0, 0.0]::FLOAT[2]), ('far', 'c.mp4', 1.0, [-1.0, 0.0]::FLOAT[2]), "
                "('near', 'd.mp4', 1.0, [1.0, 0.1]::FLOAT[2]), ('none', 'e.mp4', 1.0, NULL)"
                ") t(video_id, uri, duration_s, embedding)")
    con.execute("CREATE TABLE segments AS SELECT video_id, 0 AS segment_index, 0.0 AS start_s, 1.0 AS end_s, "
                "embedding FROM videos")
    for level in ("video", "segment"):
        assert list(rank(con, np.array([1.0, 0.0]), 4, level).video_id)[:2] == ["near", "far"]
        assert list(rank(con, np.array([1.0, 0.0]), 2, level).video_id) == ["near", "far"]  # (NaN takes no place)
        assert sorted(rank(con, np.array([1.0, 0.0]), 10, level).video_id) == ["far", "nan", "near", "zero"]


def test_a_hit_shows_its_own_levels_caption():
    # a segment's caption, else its video's; a video's own caption, not one of its segments'
    from pipeline.search import rank

    con = duckdb.connect()
    con.execute("CREATE TABLE videos AS SELECT * FROM (VALUES ('a', 'a.mp4', 2.0, [1.0, 0.0]::FLOAT[2]), "
                "('b', 'b.mp4', 2.0, [0.9, 0.1]::FLOAT[2])) t(video_id, uri, duration_s, embedding)")
    con.execute("CREATE TABLE segments AS SELECT video_id, i AS segment_index, i::DOUBLE AS start_s, "
                "i + 1.0 AS end_s, embedding FROM videos, range(2) r(i)")
    con.execute("CREATE VIEW captions AS SELECT * FROM (VALUES ('a', 'video', NULL, 'all of a'), "
                "('a', 'segment', 1, 'the end of a'), ('b', 'segment', 0, 'the start of b')) "
                "t(video_id, level, segment_index, caption)")
    videos = rank(con, np.array([1.0, 0.0]), 2, "video")
    assert dict(zip(videos.video_id, videos.caption.fillna("-"))) == {"a": "all of a", "b": "-"}
    segments = rank(con, np.array([1.0, 0.0]), 4, "segment")
    captions = zip(segments.video_id, segments.segment_index, segments.caption.fillna("-"))
    assert {(v, int(i)): c for v, i, c in captions} == {
        ("a", 0): "all of a", ("a", 1): "the end of a", ("b", 0): "the start of b", ("b", 1): "-"}


def _embedded_output(out: Path, videos: int, per_batch: int, dim: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """An output of `videos` videos with random embeddings, each with 4 segments with theirs,
    published `per_batch` videos a batch: (video ids, video embeddings, segment embeddings)."""
    from datetime import datetime, timezone

    from pipeline.ledger import LEDGER_SCHEMA, UNITS
    from pipeline.store import Store
    from pipeline.writer import BatchWriter

    store, run_id = Store(str(out)), "20240101T000000000000Z-aaaaaa"
    rng = np.random.default_rng(0)
    ids = [f"{i:020x}" for i in range(videos)]
    video_vectors = rng.standard_normal((videos, dim), dtype=np.float32)
    segment_vectors = rng.standard_normal((videos, 4, dim), dtype=np.float32)
    for batch, first in enumerate(range(0, videos, per_batch)):
        writer = BatchWriter(store, run_id, "2024-01-01")
        writer.embedding_dim = dim
        entries = []
        for i in range(first, min(videos, first + per_batch)):
            keys = {"video_id": ids[i], "run_id": run_id, "config_fingerprint": "f"}
            writer.add("videos", [{**keys, "uri": f"/videos/{i}.mp4", "duration_s": 4.0, "status": "ok",
                                   "processed_at": datetime.now(timezone.utc), "embedding": video_vectors[i]}])
            writer.add("segments", [{**keys, "segment_index": n, "start_frame": n, "end_frame": n, "start_s": n,
                                     "end_s": n + 1.0, "embedding": segment_vectors[i, n]} for n in range(4)])
            entries.append({**dict.fromkeys(LEDGER_SCHEMA.names), "uri": f"/videos/{i}.mp4", "video_id": ids[i],
                            "status": "ok", "last_run_id": run_id, **{f"{u}_run_id": run_id for u in UNITS}})
        store.publish({"kind": "batch", "run_id": run_id, "batch": batch, "run_date": "2024-01-01",
                       "files": writer.stage(batch), "ledger": entries}, f"{run_id}-{batch:05d}.json")
    return ids, video_vectors, segment_vectors


def test_segments_without_an_embedding_in_the_files_leave_the_others_searchable(tmp_path, tiny_models):
    """A video with more shots than sampling.max_frames has segments with no frame, so no
    embedding: read from Parquet, such a null holds nulls, which list_cosine_similarity refused
    (DuckDB 2.0), and every search of the output failed."""
    from workers.synthetic import scene_frames

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "cuts.mp4", scene_frames([30, 60], 90, 64, 48), fps=25)
    config = RunConfig.from_dict({"stages": ["shots", "embed"], "models": {"embed": tiny_models["embed"]},
                                  "sampling": {"max_frames": 1}, "output": {"thumbnails": False},
                                  "resources": {"executor": "local"}})
    run_job(str(videos), str(tmp_path / "out"), config, progress=False)
    with results.open(str(tmp_path / "out")) as r:
        assert r.sql("SELECT count(*), count(embedding) FROM segments").fetchall() == [(3, 1)]
        for level in ("segment", "video"):
            assert len(r.search("a red scene", level=level)) == 1


def test_search_ranks_within_a_memory_limit_below_the_embeddings_size(tmp_path):
    """The captions' subqueries, the join to videos and a filter on the view had DuckDB hold every
    row's embedding (5.6 GB for 750k segments of 512 dims): it holds the best rows only."""
    from pipeline.search import rank

    ids, video_vectors, segment_vectors = _embedded_output(tmp_path / "out", 8000, 100, 512)  # 16 + 64 MB
    query = np.random.default_rng(1).standard_normal(512).astype(np.float32)

    def best(vectors: np.ndarray) -> list[int]:
        cosine = vectors @ query / np.linalg.norm(vectors, axis=-1) / np.linalg.norm(query)
        return list(np.argsort(-cosine.reshape(-1), kind="stable")[:5])

    with results.open(str(tmp_path / "out")) as r:
        for setting in ("threads = 1", "memory_limit = '32MB'", "temp_directory = ''"):  # no spilling to disk
            r.con.execute(f"SET {setting}")
        found = rank(r.con, query, 5, "video")
        assert list(found.video_id) == [ids[i] for i in best(video_vectors)]
        found = rank(r.con, query, 5, "segment")
        assert list(zip(found.video_id, found.segment_index)) == [(ids[i // 4], i % 4) for i in best(segment_vectors)]
        assert list(found.uri) == [f"/videos/{i // 4}.mp4" for i in best(segment_vectors)]


def test_bad_requests_are_refused(coloured):
    with results.open(coloured["out"]) as r:
        with pytest.raises(SearchError, match='^the search text is empty: say in words what to look for, e.g. "a '):
            r.search("  ")
        with pytest.raises(SearchError, match=r"^level 'frame' \(--level\): choose 'video' or 'segment'"):
            r.search(QUERY, level="frame")
        for top in (0, "5", 2.5):  # a Python caller's: it was a TypeError for "5"
            with pytest.raises(SearchError, match=r"^top \(--top\) must be a whole number of at least 1"):
                r.search(QUERY, top=top)
        if not torch.cuda.is_available():  # the device, not the model (it said "give a copy with --model")
            with pytest.raises(SearchError, match=r"^device 'cuda' \(--device\): no CUDA device is visible here; "
                                                  r"use --device cpu, or auto$"):
                r.search(QUERY, device="cuda")


def test_the_commands_device_is_refused_as_its_own_flag(coloured, capsys):
    # it was read as the run configuration's models.device: "models.device: 'gpu' is not one of auto, cpu, ..."
    assert main(["search", coloured["out"], QUERY, "--device", "gpu"]) == 2
    assert capsys.readouterr().err.strip() == ("vidlens: error: device 'gpu' (--device): choose auto, cpu, cuda, "
                                               "cuda:N or mps")


def test_an_apple_gpu_is_a_device_search_takes_as_run_does(coloured, capsys):
    # `vidlens run --device mps` runs the models on an Apple GPU; search took mps too, but its help
    # left it out, and where there is none it said "no CUDA device is visible here"
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE auto, cpu, cuda, cuda:N or mps" in help_text
    if not torch.backends.mps.is_available():
        assert main(["search", coloured["out"], QUERY, "--device", "mps"]) == 2
        assert capsys.readouterr().err.strip() == (
            "vidlens: error: device 'mps' (--device): this machine has no Apple GPU (MPS) that PyTorch can use; "
            "use --device cpu, or auto")


def test_a_recorded_model_missing_here_asks_for_a_local_copy(coloured):
    with results.open(coloured["out"]) as r:
        source = embedding_source(r.con)
    gone = EmbeddingSource("models/clip-moved-away", "local", source.embedding_dim, TEMPLATE,
                           False, None, source.run_ids)
    with pytest.raises(SearchError, match="--model") as refused:
        encode_query(gone, QUERY)
    said = str(refused.value)
    # what went wrong and what search takes, not the loader's advice for a run's configuration
    assert "model= in Python" in said and ".)." not in said and "--embed-model" not in said


def test_printed_hits_line_up_after_the_longest_name():
    import pandas as pd

    from pipeline.search import render

    found = pd.DataFrame({"rank": [1, 2, 3], "video_id": ["a", "b", "c"],
                          "uri": ["s3://m/a.mp4", "s3://m/clips/longer.mp4", "s3://m/视频.mp4"],
                          "segment_index": [None, 3, None], "start_s": [0.0, 12.4, 0.0], "end_s": [42.1, 19.8, 42.1],
                          "score": [0.312, 0.287, 0.2], "caption": ["a girl reads", None, None]})
    lines = render(found).splitlines()
    assert lines[0].index("-  42.10s") == lines[1].index("-  19.80s")  # the time ranges in one column
    assert lines[2].index("-  42.10s") == lines[0].index("-  42.10s") - 2  # two wide characters, shown 4 wide
    assert "s3://m/clips/longer.mp4 #3" in lines[1] and lines[0].endswith("a girl reads")
    # a file name may hold a newline (videos.uri keeps it): each hit stays one line
    found.loc[1, "uri"] = "s3://m/two\nlines.mp4"
    assert len(render(found).splitlines()) == 3 and "s3://m/two\\nlines.mp4 #3" in render(found)


def test_json_hits_are_written_as_query_writes_rows(coloured, capsys):
    assert main(["search", coloured["out"], QUERY, "--top", "3", "--format", "json"]) == 0
    text = capsys.readouterr().out
    hits = [json.loads(line) for line in text.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["uri"].endswith("red.mp4")
    assert hits[0]["segment_index"] is None and isinstance(hits[0]["score"], float)
    assert "\\/" not in text and f'"{coloured["videos"]}/' in text  # slashes as they are
    # and as CSV: a header, then a row a hit (not the table printed on screen)
    import csv
    import io

    assert main(["search", coloured["out"], QUERY, "--top", "3", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["rank"] for row in rows] == ["1", "2", "3"] and rows[0]["uri"].endswith("red.mp4")
    assert "" not in rows[0]  # (no unnamed column of pandas' index)


def test_printed_hits_line_up_in_columns_shown_where_a_wide_name_is_the_longest():
    import pandas as pd

    from pipeline.search import render

    # 猫と犬 (wide) and ＡＢ (fullwidth) take two columns a character: "s3://m/猫と犬.mp4" is 14
    # characters and 17 columns, longer on screen than "s3://m/abcd.mp4" (15 and 15)
    uris = ["s3://m/abcd.mp4", "s3://m/猫と犬.mp4", "s3://m/ＡＢ.mp4"]
    found = pd.DataFrame({"rank": [1, 2, 3], "video_id": ["a", "b", "c"], "uri": uris,
                          "segment_index": [None] * 3, "start_s": [0.0] * 3, "end_s": [42.1] * 3,
                          "score": [0.3, 0.2, 0.1], "caption": [None] * 3})
    lines = render(found).splitlines()
    columns = [line.index("-  42.10s") + sum(c in "猫と犬ＡＢ" for c in line) for line in lines]
    assert columns == [columns[0]] * 3
    assert "s3://m/猫と犬.mp4     0.00-  42.10s" in lines[1]  # the longest name: no padding

"""The run configuration: YAML loading, overrides, validation and fingerprints."""

import re

import pytest

from pipeline.arguments import build_parser, config_from_args
from schemas.config import ALL_STAGES, ConfigError, RunConfig, SamplingConfig


def test_defaults_run_every_stage():
    config = RunConfig()
    assert config.stages == ALL_STAGES
    assert config.sampling.mode == "uniform" and config.sampling.num_frames == 8
    assert len(config.labels.objects) == 80


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "stages: [captions, shots]\n"
        "models:\n  embed: ./models/clip\n  captions: ./models/git\n"
        "sampling:\n  mode: fps\n  fps: 2\n"
        "captions:\n  num_beams: 3\n"
    )
    config = RunConfig.from_yaml(path)
    assert config.stages == ("shots", "captions")  # canonical order
    assert config.models.embed == "./models/clip"
    assert config.sampling.fps == 2.0
    assert RunConfig.from_dict(config.to_dict()) == config
    changed = config.with_overrides({"captions.num_beams": 1, "sampling.num_frames": "16"})
    assert changed.captions.num_beams == 1 and changed.sampling.num_frames == 16


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"sampling": {"nmu_frames": 3}}, "sampling.nmu_frames: unknown setting"),
        ({"sampling": {"num_frames": "many"}}, "sampling.num_frames: expected int"),
        ({"sampling": {"mode": "random"}}, "sampling.mode"),
        ({"stages": ["shots", "faces"]}, "unknown stage(s) faces"),
        ({"models": "clip"}, "models: expected a mapping"),
        ({"captions": {"per_segment": "maybe"}}, "captions.per_segment: expected true or false"),
        ({"stages": []}, "stages: none given"),  # an unset $STAGES ran nothing useful, exit 0
        ({"models": {"device": "tpu"}}, "models.device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        ({"sampling": {"fps": float("inf")}}, "sampling.fps: expected a finite number"),
        ({"shots": {"threshold": float("nan")}}, "shots.threshold: expected a finite number"),
        ({"storage": {"retries": -1}}, "storage.retries: must be at least 0"),
        ({"resources": {"actor_memory_bytes": -5}}, "resources.actor_memory_bytes: must be at least 1"),
        ({"match": {"template": True}}, "match.template: expected text, got True (YAML reads an unquoted"),
        ({"match": {"queries": ["a dog", " "]}}, "match.queries: an empty query"),
        ({"sampling": {"num_frames": 2.5}}, "sampling.num_frames: expected a whole number, got 2.5"),
        ({"sampling": {"num_frames": "2.5"}}, "sampling.num_frames: expected a whole number"),
        ({"shots": {"max_frames": 1.5}}, "shots.max_frames: expected a whole number, got 1.5"),
        ({"shots": {"max_frames": "three hours"}}, "shots.max_frames: expected int, got 'three hours'"),
        ({"models": {"text_cache": " "}}, "models.text_cache: empty"),
        # (taken, and Hugging Face's cache_dir="" is the current folder: models downloaded there)
        ({"models": {"cache_dir": ""}}, "models.cache_dir: empty: give a folder, or leave it out"),
    ],
)
def test_bad_values_name_the_key(raw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_dict(raw)


def test_unknown_settings_that_yaml_reads_as_text_and_as_true_or_false_are_named(tmp_path):
    # (sorting them to name the first raised TypeError: a traceback, not the file's line)
    path = tmp_path / "run.yaml"
    path.write_text("output:\n  thumbnails: false\n  on: true\n  width: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: output.True: unknown setting \(known: commit_every_s, "):
        RunConfig.from_file(path)


def test_a_list_written_as_text_is_split_at_its_commas_and_a_yes_or_no_read_whatever_its_case():
    # "embed, captions," as a shell variable or a YAML line gives it: no " captions", no empty stage
    config = RunConfig.from_dict({"stages": "embed, captions,", "labels": {"objects": " car,dog ,, "},
                                  "output": {"thumbnails": "No"}, "captions": {"per_segment": "TRUE"}})
    assert config.stages == ("embed", "captions") and config.labels.objects == ("car", "dog")
    assert (config.output.thumbnails, config.captions.per_segment) == (False, True)


def test_a_toml_config_file_is_read_as_its_yaml_twin(tmp_path):
    """A .toml file is read as TOML (the same sections and keys); a mistake in it is one line
    naming the file and where; `vidlens run --config run.toml` takes it."""
    (tmp_path / "run.yaml").write_text("stages: [captions, shots]\nsampling:\n  mode: fps\n  fps: 2\n"
                                       "labels:\n  objects: [car, dog]\noutput:\n  thumbnails: false\n")
    (tmp_path / "run.toml").write_text('stages = ["captions", "shots"]\n[sampling]\nmode = "fps"\nfps = 2\n'
                                       '[labels]\nobjects = ["car", "dog"]\n[output]\nthumbnails = false\n')
    assert RunConfig.from_file(tmp_path / "run.toml") == RunConfig.from_file(tmp_path / "run.yaml")
    assert RunConfig.from_file(tmp_path / "run.toml").sampling.fps == 2.0
    (tmp_path / "RUN.TOML").write_text((tmp_path / "run.toml").read_text())  # (its name's case aside)
    assert RunConfig.from_file(tmp_path / "RUN.TOML") == RunConfig.from_file(tmp_path / "run.yaml")
    (tmp_path / "bad.toml").write_text("[sampling]\nmode fps\n")
    with pytest.raises(ConfigError, match=r"^config file .*bad.toml is not valid TOML: .*\(at line 2, column 6\)$"):
        RunConfig.from_file(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text("[sampling]\nnum_frame = 4\n")
    with pytest.raises(ConfigError, match=r"typo.toml: .*num_frame"):
        RunConfig.from_file(tmp_path / "typo.toml")
    from pipeline.arguments import build_parser, config_from_args

    args = build_parser().parse_args(["run", "v", "--out", "o", "--config", str(tmp_path / "run.toml")])
    assert config_from_args(args).labels.objects == ("car", "dog")


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sampling: {num_frames: 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        RunConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a folder: give the YAML or TOML file in it"):
        RunConfig.from_yaml(tmp_path)


def test_a_config_file_says_what_yaml_would_have_kept_quiet(tmp_path):
    path = tmp_path / "run.yaml"
    # a section written twice: PyYAML kept the last, and num_frames went back to its default
    path.write_text("sampling:\n  num_frames: 4\nsampling:\n  fps: 2.0\n")
    with pytest.raises(ConfigError, match=r"run.yaml: sampling is given twice \(line 3\)"):
        RunConfig.from_yaml(path)
    # ... though a merge's keys may be given again: the mapping's own override them
    import yaml

    from schemas.config_reading import unique_keys_loader

    merged = yaml.load("base: &base {num_frames: 4, fps: 2.0}\nsampling:\n  <<: *base\n  num_frames: 6\n",
                       Loader=unique_keys_loader())
    assert merged["sampling"] == {"num_frames": 6, "fps": 2.0}
    # Notepad's "Unicode" (UTF-16): Python's decode error named neither the file nor the fix
    path.write_bytes("sampling:\n  num_frames: 4\n".encode("utf-16"))
    with pytest.raises(ConfigError, match="run.yaml is not UTF-8 text .*save it as UTF-8"):
        RunConfig.from_yaml(path)
    path.write_bytes("sampling:\n  num_frames: 4\n".encode("utf-8-sig"))
    assert RunConfig.from_yaml(path).sampling.num_frames == 4


def test_a_config_file_that_is_not_yaml_is_told_in_one_line(tmp_path):
    # PyYAML's own text is four lines with a caret, which broke the one-line error
    path = tmp_path / "run.yaml"
    path.write_text("sampling:\n  mode: fps\n   fps: 1\n")
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_yaml(path)
    assert str(refused.value) == (f"config file {path} is not valid YAML: mapping values are not allowed here "
                                  "(line 3, column 7)")
    path.write_text('sampling:\n  mode: "fps\x07"\n')  # (a character YAML refuses: PyYAML gives no line)
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_yaml(path)
    assert str(refused.value) == (f"config file {path} is not valid YAML: unacceptable character #x0007: special "
                                  "characters are not allowed")


def test_a_wrong_credential_value_is_never_echoed(tmp_path):
    # no secret is registered for redaction before the configuration is built: the error showed it
    path = tmp_path / "run.yaml"
    path.write_text("storage:\n  key: admin\n  secret: 87654321\n")
    with pytest.raises(ConfigError, match=r"storage.secret: expected text, got the number \*\*\*") as refused:
        RunConfig.from_yaml(path)
    assert "87654321" not in str(refused.value)


def test_fingerprint_ignores_resources_and_tracks_results():
    base = RunConfig()
    assert base.fingerprint() == RunConfig().fingerprint()
    assert base.with_overrides({"resources.max_actors": 8}).fingerprint() == base.fingerprint()
    assert base.with_overrides({"incremental.give_up_after": 0}).fingerprint() == base.fingerprint()
    assert base.with_overrides({"models.text_cache": "off"}).fingerprint() == base.fingerprint()
    assert base.with_overrides({"captions.num_beams": 4}).fingerprint() != base.fingerprint()


def test_the_config_fingerprint_hashes_the_queries_files_lines_and_no_setting_that_changes_no_row(tmp_path):
    # it hashed the file's path (an edited file resubmitted the same day kept its job id, and was
    # not submitted again) and the model cache and output batching, which change no row
    queries = tmp_path / "queries.txt"
    queries.write_text("a dog\n")
    config = RunConfig.from_dict({"match": {"queries_file": str(queries)}})
    before = config.fingerprint()
    queries.write_text("a dog\na cat\n")
    assert config.fingerprint() != before
    assert config.fingerprint() == RunConfig.from_dict({"match": {"queries": ["a dog", "a cat"]}}).fingerprint()
    for setting, value in (("models.cache_dir", str(tmp_path)), ("output.rows_per_file", 10),
                           ("output.commit_every_videos", 1), ("output.commit_every_s", 5.0),
                           ("sampling.max_frame_pixels", 7680 * 4320)):
        assert config.with_overrides({setting: value}).fingerprint() == config.fingerprint(), setting
    # a file not here (a path on a cluster's nodes) is fingerprinted by its path, as before
    assert RunConfig.from_dict({"match": {"queries_file": "/cluster/queries.txt"}}).fingerprint() != before


def test_stage_fingerprint_changes_only_for_the_stage_it_concerns():
    base = RunConfig()
    changed = base.with_overrides({"captions.num_beams": 4})
    assert changed.stage_fingerprint("captions") != base.stage_fingerprint("captions")
    for stage in ("shots", "embed", "objects", "ocr", "match"):
        assert changed.stage_fingerprint(stage) == base.stage_fingerprint(stage)


def test_the_default_fingerprints_stay_what_every_ledger_holds():
    # Outputs keep these per video: a change to them reruns every video of every bucket at the
    # upgrade. A new setting that can change a result goes in ADDED_SETTINGS with its default.
    from pipeline.ledger import unit_fingerprints

    assert unit_fingerprints(RunConfig()) == {
        "core": "c687e41997c5f5e3", "labels": "ee28af374a88abb3", "matches": "cfe9b7d010283a43",
        "captions": "1a9b9c9dc7c158fa", "texts": "60e31c813d749378"}
    assert RunConfig().fingerprint() == "23813b3b865dc32f"
    # (nor do the settings of what a run does with earlier failures, which change no row)
    retrying = RunConfig().with_overrides({"incremental.give_up_after": 0})
    assert unit_fingerprints(retrying) == unit_fingerprints(RunConfig())
    assert retrying.fingerprint() == RunConfig().fingerprint()


def test_the_frame_bound_admits_every_camera_and_reruns_nothing():
    from pipeline.ledger import unit_fingerprints

    # 8K, 12K cinema (Blackmagic's 12288x6480), 12K and 16K 360 (equirectangular, 2:1); not the
    # security review's 16000x16000 frame
    bound = SamplingConfig().max_frame_pixels
    assert all(w * h <= bound for w, h in ((8192, 4320), (12288, 6480), (11520, 5760), (16384, 8192)))
    assert 16000 * 16000 > bound
    # a limit: it changes no row of a video it admits, and one it refused runs again once it is
    # raised; so do the bounds on a video's frames and sampled pixels (until 2026-12-07 a change
    # to either reran every video of the output)
    for setting, value in (("sampling.max_frame_pixels", 7680 * 4320), ("sampling.max_video_frames", 1000),
                           ("sampling.max_pixels_per_video", 8 * 1920 * 1080)):
        lowered = RunConfig().with_overrides({setting: value})
        assert unit_fingerprints(lowered) == unit_fingerprints(RunConfig()), setting
        assert lowered.fingerprint() == RunConfig().fingerprint(), setting


def test_shot_settings_rerun_nothing_where_they_change_no_row():
    # the shots section was hashed into core with shots switched off too, and the windows a
    # forward pass takes (memory and speed) with them on: changing either reran every video
    from pipeline.ledger import unit_fingerprints

    for stages in (["embed", "captions"], ["shots", "embed"]):
        config = RunConfig.from_dict({"stages": stages})
        batched = config.with_overrides({"shots.batch_windows": 32})
        assert unit_fingerprints(batched) == unit_fingerprints(config) and batched.fingerprint() == config.fingerprint()
    off = RunConfig.from_dict({"stages": ["embed"]})
    assert unit_fingerprints(off.with_overrides({"shots.threshold": 0.3})) == unit_fingerprints(off)
    on = RunConfig.from_dict({"stages": ["shots", "embed"]})
    assert unit_fingerprints(on.with_overrides({"shots.threshold": 0.3}))["core"] != unit_fingerprints(on)["core"]


def test_the_shot_bound_reruns_the_videos_where_shots_run_and_changes_no_fingerprint_at_its_default():
    # a video past it gets one segment, not its shots: a result, hashed where shots run; at the default
    # it came with it is left out, so that the version that added it reruns no output's videos
    from pipeline.ledger import unit_fingerprints

    assert RunConfig().shots.max_frames == 324_000  # 3 hours at 30 fps
    on = RunConfig.from_dict({"stages": ["shots", "embed"]})
    for bound in (0, 1000):
        changed = unit_fingerprints(on.with_overrides({"shots.max_frames": bound}))
        assert all(changed[unit] != made for unit, made in unit_fingerprints(on).items() if made), bound
        assert on.with_overrides({"shots.max_frames": bound}).fingerprint() != on.fingerprint()
    off = RunConfig.from_dict({"stages": ["embed"]})
    assert unit_fingerprints(off.with_overrides({"shots.max_frames": 1000})) == unit_fingerprints(off)
    assert "max_frames" not in RunConfig()._fingerprinted()["shots"]


def test_settings_the_configuration_does_not_read_rerun_nothing():
    """Each reran every video (a night's decoding and embedding) for the same rows."""
    from pipeline.ledger import unit_fingerprints

    for stages, changes in (
            (["embed", "objects"], {"labels.scenes": ["beach", "forest"], "labels.scene_templates": ["a {}"]}),
            (["embed", "scenes"], {"labels.objects": ["cat"], "labels.object_templates": ["a {}"]}),
            (["embed"], {"sampling.fps": 2.0, "sampling.frames_per_shot": 3, "captions.frames_per_caption": 2}),
            (["embed", "captions"], {"captions.frames_per_caption": 2}),
            (["captions"], {"output.frame_embeddings": False}),
            (["embed", "match"], {"match.template": "a video of {}"}),  # (no query)
    ):
        config = RunConfig.from_dict({"stages": stages})
        for key, value in changes.items():
            assert unit_fingerprints(config.with_overrides({key: value})) == unit_fingerprints(config), key
    fps = RunConfig.from_dict({"stages": ["embed"], "sampling": {"mode": "fps"}})
    assert unit_fingerprints(fps.with_overrides({"sampling.num_frames": 4})) == unit_fingerprints(fps)
    no_thumbnails = RunConfig.from_dict({"output": {"thumbnails": False}})
    assert unit_fingerprints(no_thumbnails.with_overrides({"output.thumbnail_width": 320})) == \
        unit_fingerprints(no_thumbnails)
    # the rows of outputs made before 2026-12-06 with such a setting away from its default are current
    from pipeline.ledger import accepted_fingerprints

    for settings, made in (({"sampling": {"mode": "fps", "num_frames": 16}}, {"core": "42a39c9cc6549374",
                                                                             "captions": "2cdff18738259cb0"}),
                           ({"captions": {"frames_per_caption": 8}}, {"captions": "6080bcc75e11e396"})):
        accepted = accepted_fingerprints(RunConfig.from_dict(settings))
        assert all(fingerprint in accepted[unit] for unit, fingerprint in made.items()), settings
    # and what is read still reruns what it changes
    config = RunConfig.from_dict({"stages": ["embed", "objects", "match"], "match": {"queries": ["a dog"]}})
    for key, value, unit in (("labels.objects", ["cat"], "labels"), ("sampling.num_frames", 4, "core"),
                             ("match.template", "a video of {}", "matches"), ("output.thumbnail_width", 320, "core")):
        assert unit_fingerprints(config.with_overrides({key: value}))[unit] != unit_fingerprints(config)[unit], key


def test_a_queries_file_deleted_once_match_is_switched_off_is_not_read(tmp_path):
    # every run raised ConfigError (the file does not exist) judging the rows match had made
    from pipeline.ledger import accepted_fingerprints, unit_fingerprints

    queries = tmp_path / "queries.txt"
    queries.write_text("a dog\n")
    with_match = RunConfig.from_dict({"stages": ["embed", "match"], "match": {"queries_file": str(queries)}})
    before = unit_fingerprints(with_match)
    without = with_match.with_overrides({"stages": ["embed"]})
    queries.unlink()
    accepted = accepted_fingerprints(without)
    assert before["core"] in accepted["core"] and unit_fingerprints(without)["matches"] is None


def test_a_new_embedding_model_reruns_core_whenever_the_embed_stage_runs():
    # objects, scenes and match run the embed stage, whose embeddings the core tables keep: with
    # `embed` not listed, a new embedding model reran the labels only, and old and new videos'
    # embeddings came from two models in one view
    from pipeline.ledger import accepted_fingerprints, unit_fingerprints

    for stages in (["embed", "objects"], ["objects"], ["scenes"], ["match"]):
        config = RunConfig.from_dict({"stages": stages, "match": {"queries": ["a dog"]}})
        other = config.with_overrides({"models.embed": "google/siglip-base-patch16-224"})
        before, after = unit_fingerprints(config), unit_fingerprints(other)
        assert before["core"] != after["core"], stages
        assert after["core"] not in accepted_fingerprints(config)["core"], stages
    # listing `embed` beside objects or not writes the same core rows: no rerun either way
    listed = RunConfig.from_dict({"stages": ["embed", "objects"]})
    assert unit_fingerprints(listed)["core"] == unit_fingerprints(listed.with_overrides({"stages": ["objects"]}))["core"]


def test_ocr_on_every_sampled_frame_reruns_only_the_texts():
    from pipeline.ledger import unit_fingerprints

    base = unit_fingerprints(RunConfig())
    sampled = unit_fingerprints(RunConfig.from_dict({"ocr": {"frames": "sampled"}}))
    assert {unit for unit in base if base[unit] != sampled[unit]} == {"texts"}
    with pytest.raises(ConfigError, match="ocr.frames: 'all' is not one of keyframes, sampled"):
        RunConfig.from_dict({"ocr": {"frames": "all"}})


@pytest.mark.parametrize("setting, value", [("match.template", "a video of"),
                                            ("labels.object_templates", ["a photo of a {0}"])])
def test_a_template_without_its_placeholder_is_refused(setting, value):
    # every query (or label name) became the same prompt: equal scores, tables quietly meaningless
    with pytest.raises(ConfigError, match=f"{setting}: .* has no {{}} where the text goes"):
        RunConfig().with_overrides({setting: value})


def test_a_precision_no_model_takes_is_refused_with_the_configuration():
    # said by the model stages only: `vidlens submit` and `schedule` took it, and the job failed
    # on the cluster (or the cron entry every night)
    with pytest.raises(ConfigError, match="models.dtype: 'bf16' is not one of auto, float32, float16, bfloat16"):
        RunConfig.from_dict({"models": {"dtype": "bf16"}})


def test_a_setting_added_later_changes_no_fingerprint_at_its_default(monkeypatch):
    from schemas import config as config_module

    base = RunConfig()
    snapped = base.with_overrides({"sampling.snap_to_keyframes": True})
    before = {"fingerprint": snapped.fingerprint(), "embed": snapped.stage_fingerprint("embed")}
    # as if snap_to_keyframes had come in a later version: left at its default, it is not hashed
    left_out = base._fingerprinted()
    monkeypatch.setattr(config_module, "ADDED_SETTINGS",
                        {**config_module.ADDED_SETTINGS, "sampling.snap_to_keyframes": False})
    del left_out["sampling"]["snap_to_keyframes"]
    assert base._fingerprinted() == left_out
    # set otherwise, it is hashed as any setting
    assert {"fingerprint": snapped.fingerprint(), "embed": snapped.stage_fingerprint("embed")} == before
    assert snapped.stage_fingerprint("embed") != base.stage_fingerprint("embed")


@pytest.mark.parametrize("setting, value, message", [
    ("captions.num_beams", 0, "at least 1"),  # every caption failed with a ZeroDivisionError
    ("sampling.fps", -1.0, "more than 0"),  # every video failed to sample
    ("sampling.fps", 0.0, "more than 0"),
    ("labels.min_score", 1.5, "between 0 and 1"),
    ("output.thumbnail_quality", 101, "between 1 and 100"),
    ("resources.videos_per_batch", 0, "at least 1"),
    ("resources.download_ahead_bytes", 0, "at least 1"),  # nothing downloaded ahead: download_ahead 0 says so
    ("sampling.max_frame_pixels", 0, "at least 1"),  # every video refused alike
    ("resources.min_actors", 3, "more than resources.max_actors"),
    ("incremental.give_up_after", -1, "at least 0"),
    ("shots.batch_windows", -1, "at least 0"),  # (0: by device) else refused by the shot stage, on the workers
    ("shots.max_frames", -1, "at least 0"),  # (0: no bound)
])
def test_a_value_no_stage_can_work_with_is_refused_before_the_run(setting, value, message):
    with pytest.raises(ConfigError, match=message) as refused:
        RunConfig().with_overrides({setting: value})
    assert setting.split(".")[1] in str(refused.value)


def test_text_settings_are_taken_as_written(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("models:\n  text_cache: off\n")  # as the README writes it: YAML's false
    assert RunConfig.from_yaml(path).models.text_cache == "off"
    args = build_parser().parse_args(["run", "v", "--out", "o", "--set", "match.template=a video of: {}",
                                      "--set", "models.text_cache=off", "--set", "match.queries=[a, b]",
                                      "--set", "models.embed_revision=null", "--set", "ocr.max_side=960"])
    config = config_from_args(args)
    assert (config.match.template, config.models.text_cache, config.match.queries) == \
        ("a video of: {}", "off", ("a", "b"))
    assert config.models.embed_revision is None and config.ocr.max_side == 960


@pytest.mark.parametrize("key, text, number", [("embed_revision", "1.10", "1.1"), ("captions_revision", "0123", "83"),
                                              ("embed_revision", "2024", "2024")])
def test_a_text_setting_that_yaml_reads_as_a_number_is_refused(tmp_path, key, text, number):
    # YAML's number was made text again: revision 1.10 became "1.1" and 0123 "83", silently
    path = tmp_path / "run.yaml"
    path.write_text(f"models:\n  {key}: {text}\n")
    with pytest.raises(ConfigError, match=f"models.{key}: expected text, got the number {number} .*quote it"):
        RunConfig.from_yaml(path)
    path.write_text(f"models:\n  {key}: '{text}'\n")
    assert getattr(RunConfig.from_yaml(path).models, key) == text


def test_set_reaches_into_the_mapping_settings():
    # "resources.per_stage.captions: unknown setting", and "'captions' is not a configuration section"
    def run_config(*settings):
        return config_from_args(build_parser().parse_args(
            ["run", "v", "--out", "o", *[word for setting in settings for word in ("--set", setting)]]))

    given = run_config("resources.per_stage.captions={num_gpus: 0.5}")
    assert given.resources.per_stage == {"captions": {"num_gpus": 0.5}}
    both = run_config("resources.per_stage.captions.num_gpus=0.5", "resources.per_stage.captions.min_actors=2")
    assert both.resources.per_stage == {"captions": {"num_gpus": 0.5, "min_actors": 2}}
    assert run_config("storage.options.use_ssl=false").storage.options == {"use_ssl": False}
    # a typo named as given, with what there is (as a YAML file's typo is)
    with pytest.raises(ConfigError, match=r"^--set sampling.nope: unknown setting \(known: fps, .*num_frames, "):
        run_config("sampling.nope=1")
    with pytest.raises(ConfigError, match=r"^--set samplin.mode: 'samplin' is not a configuration section "
                                          r"\(sections: captions, .*sampling, shots, storage\)"):
        run_config("samplin.mode=fps")
    with pytest.raises(ConfigError, match=r"^--set sampling.num_frames: expected int, got 'abc'"):
        run_config("sampling.num_frames=abc")


def test_set_reads_quotes_null_and_yes_as_a_config_file_would():
    def run_config(*settings):
        args = ["run", "v", "--out", "o"]
        for setting in settings:
            args += ["--set", setting]
        return config_from_args(build_parser().parse_args(args))

    config = run_config("models.embed='openai/clip'", 'match.template="a photo of {}"', "match.template=#{}")
    assert (config.models.embed, config.match.template) == ("openai/clip", "#{}")
    assert run_config('match.template="a photo of {}"').match.template == "a photo of {}"
    assert run_config("models.cache_dir=null").models.cache_dir is None
    assert run_config("models.text_cache=false").models.text_cache == "off"
    with pytest.raises(ConfigError, match="models.text_cache: expected text, got None"):
        run_config("models.text_cache=null")  # not a folder named null
    with pytest.raises(ConfigError, match="quote it"):
        run_config("models.device=yes")


def test_set_refuses_a_list_of_names_whose_bracket_is_not_closed():
    # "[dog, cat" was no YAML, so taken as text and split at commas: the labels "[dog" and "cat"
    with pytest.raises(ConfigError, match=r"--set labels.objects: '\[dog, cat' is no YAML list: close its bracket"):
        _config_of("--set", "labels.objects=[dog, cat")
    assert _config_of("--set", "labels.objects=[dog, cat]").labels.objects == ("dog", "cat")
    # a query is one text, a bracket and all
    assert _config_of("--set", "match.queries=[live] a concert").match.queries == ("[live] a concert",)
    with pytest.raises(ConfigError, match="close its bracket"):  # (a space before it, as a shell may leave)
        _config_of("--set", "labels.objects= [dog, cat")
    # only a list that opens a bracket: a text setting, or names that are no YAML, are taken as written
    assert _config_of("--set", "match.template=[query] {}").match.template == "[query] {}"
    assert _config_of("--set", "labels.objects=@home, office").labels.objects == ("@home", "office")


def _config_of(*flags):
    return config_from_args(build_parser().parse_args(["run", "v", "--out", "o", *flags]))


def test_storage_options_are_added_to_those_set_and_keep_their_text():
    # --storage-option dropped the options --set gave, and YAML 1.1 made 00123 83, 12:30:00 45000, off false
    config = _config_of("--set", "storage.options={use_ssl: false}", "--storage-option", "requester_pays=true")
    assert config.storage.options == {"use_ssl": False, "requester_pays": True}
    config = _config_of(*(f"--storage-option={option}" for option in (
        "account_name=00123", "token=12:30:00", "profile=off", "anon=FALSE", "cache=Null", "timeout=30",
        "backoff=0.5", "region=-1e3")))
    assert config.storage.options == {"account_name": "00123", "token": "12:30:00", "profile": "off", "anon": False,
                                      "cache": None, "timeout": 30, "backoff": 0.5, "region": "-1e3"}
    # a mapping in braces is one (s3fs takes its region there)
    nested = _config_of("--storage-option", "client_kwargs={region_name: eu-west-1}")
    assert nested.storage.options == {"client_kwargs": {"region_name": "eu-west-1"}}


def test_storage_options_are_added_to_those_a_dotted_set_and_the_config_give(tmp_path):
    # built from the config's options before --set's were applied, they wrote over a dotted --set's;
    # and a mapping given replaced the config's whole (its client_kwargs.verify lost)
    config = _config_of("--set", "storage.options.use_ssl=false", "--set", "storage.options.account_name=0123",
                        "--storage-option", "x=1")
    assert config.storage.options == {"use_ssl": False, "account_name": "0123", "x": 1}
    path = tmp_path / "run.yaml"
    path.write_text("storage:\n  options:\n    use_ssl: false\n    client_kwargs: {verify: false}\n")
    config = _config_of("--config", str(path), "--set", "storage.options.use_ssl=true",
                        "--storage-option", "client_kwargs={region_name: eu}")
    assert config.storage.options == {"use_ssl": True, "client_kwargs": {"verify": False, "region_name": "eu"}}


def test_an_empty_model_or_text_cache_is_refused():
    # an empty text_cache was the current folder (a cron job's: where schedule ran), a file a
    # vocabulary written there; an empty model "a folder that exists but holds no loadable model"
    for flags, said in ((["--set", "models.text_cache="], "--set models.text_cache: empty: give a folder, auto or off"),
                        (["--embed-model", ""], "models.embed: empty: give a Hugging Face model id or a local folder"),
                        (["--caption-model", " "], "models.captions: empty")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            _config_of(*flags)
    assert _config_of("--stages", "embed", "--caption-model", "").models.captions == ""  # (not read: not refused)


def test_set_takes_0_and_1_for_a_boolean():
    # the texts "0" and "1" were taken, the numbers YAML reads them as refused ("expected true or false, got 0")
    assert _config_of("--set", "output.thumbnails=0").output.thumbnails is False
    assert RunConfig.from_dict({"output": {"thumbnails": 1}}).output.thumbnails is True
    with pytest.raises(ConfigError, match="expected true or false, got 2"):
        _config_of("--set", "output.thumbnails=2")


def test_set_takes_a_list_of_texts_that_is_no_yaml_list_as_written():
    # "a dog: running" was a mapping ("expected a list, got {'a dog': 'running'}"), "#1 trending" a comment (None)
    assert _config_of("--set", "match.queries=a dog: running").match.queries == ("a dog: running",)
    assert _config_of("--set", "match.queries=#1 trending").match.queries == ("#1 trending",)
    assert _config_of("--set", "match.queries=[a, b]").match.queries == ("a", "b")
    assert _config_of("--set", "stages=shots,embed").stages == ("shots", "embed")


def test_a_sentence_keeps_its_commas_and_null_sets_no_list():
    # "a dog, running" was two queries, and null the query "null"
    assert _config_of("--set", "match.queries=a dog, running").match.queries == ("a dog, running",)
    assert _config_of("--set", "labels.object_templates=a photo of a {}, outdoors").labels.object_templates == (
        "a photo of a {}, outdoors",)
    assert RunConfig.from_dict({"match": {"queries": "a dog, running"}}).match.queries == ("a dog, running",)
    assert _config_of("--set", "labels.objects=dog, cat").labels.objects == ("dog", "cat")  # names: split
    for none in ("null", "~", ""):
        assert _config_of("--query", "a cat", "--set", f"match.queries={none}").match.queries == ("a cat",)
        assert _config_of("--set", f"labels.scene_templates={none}").labels.scene_templates == ()


def test_no_label_names_for_a_label_stage_that_runs_is_refused():
    # it ran "ok" with no labels at all
    with pytest.raises(ConfigError, match="labels.objects: none given, and the objects stage runs"):
        _config_of("--set", "labels.objects=null")
    with pytest.raises(ConfigError, match="labels.scenes: none given"):
        RunConfig.from_dict({"labels": {"scenes": []}})
    assert _config_of("--set", "labels.objects=", "--set", "stages=scenes").labels.objects == ()


def test_resources_per_stage_is_checked_whether_or_not_the_stage_runs():
    from pipeline.plan import PlanError, build_plan

    for per_stage, message in (({"decode": 3}, "per_stage.decode: expected a mapping"),
                               ({"decode": {"videos_per_batch": "abc"}}, "decode.videos_per_batch: expected a whole"),
                               ({"captions": {"num_gpuz": 0.5}}, "captions.num_gpuz: unknown setting"),
                               ({"captions": {"num_gpus": -1}}, "captions.num_gpus: expected 0 or more"),
                               ({"ocr": {"max_actors": 0}}, "ocr.max_actors: expected 1 or more"),
                               ({"sample": {"num_cpus": 0}}, "sample.num_cpus: expected more than 0")):
        config = RunConfig.from_dict({"stages": ["shots"], "resources": {"per_stage": per_stage}})
        with pytest.raises(PlanError, match=message):
            build_plan(config, gpus_visible=0)


def test_a_memory_size_written_8e9_is_a_number_as_the_docs_write_it(tmp_path):
    from pipeline.plan import build_plan

    path = tmp_path / "run.yaml"  # YAML reads 8e9 (no dot) as text
    path.write_text("stages: [captions]\nresources:\n  actor_memory_bytes: 8e9\n"
                    "  per_stage: {captions: {num_gpus: 0.5, memory_bytes: 8e9}}\n")
    config = RunConfig.from_yaml(path)
    assert config.resources.actor_memory_bytes == 8 * 10**9
    captions = [spec for spec in build_plan(config, gpus_visible=1) if spec.name == "captions"][0]
    assert captions.memory == 8 * 10**9 and captions.num_gpus == 0.5


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sampling:\n  num_frames: 4\nmatch:\n  queries: [a dog]\n")
    args = build_parser().parse_args([
        "run", "videos", "--out", "out", "--config", str(path), "--num-frames", "12",
        "--query", "a cat", "--stages", "shots,embed", "--set", "captions.max_new_tokens=7",
    ])
    config = config_from_args(args)
    assert config.sampling.num_frames == 12
    assert config.match.queries == ("a dog", "a cat")
    assert config.stages == ("shots", "embed")
    assert config.captions.max_new_tokens == 7
    # --query adds to the queries a --set gives, as to the file's (the --set wrote over it)
    for given in ("[a bird]", "a bird"):
        args = build_parser().parse_args(["run", "videos", "--out", "out", "--config", str(path), "--query", "a cat",
                                          "--set", f"match.queries={given}"])
        assert config_from_args(args).match.queries == ("a bird", "a cat")


def test_queries_file(tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("# what to find\na dog\n\na cat\na dog\n  # another comment\n")
    config = RunConfig.from_dict({"match": {"queries": ["a bird"], "queries_file": str(queries)}})
    assert config.all_queries() == ("a bird", "a dog", "a cat")
    queries.write_bytes("a dog\r\na cat\r\n".encode("utf-8-sig"))  # as Notepad saves it
    assert config.all_queries() == ("a bird", "a dog", "a cat")


def test_a_queries_file_written_with_a_tilde_is_told_to_be_written_in_full(tmp_path, monkeypatch):
    # (it said "~/queries.txt does not exist" of a file that is there: the ~ is read as a folder's name)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "queries.txt").write_text("a dog\n")
    config = RunConfig.from_dict({"match": {"queries_file": "~/queries.txt"}})
    with pytest.raises(ConfigError, match=re.escape(f"match.queries_file: ~/queries.txt does not exist (~ is not "
                                                    f"expanded here: write {tmp_path / 'queries.txt'})")):
        config.all_queries()


def test_the_example_configuration_shows_every_setting_with_its_default():
    import yaml
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "config.example.yaml"
    example = RunConfig.from_yaml(path)
    assert example == RunConfig().with_overrides({"match.queries": list(example.match.queries)})

    def keys(section, prefix=""):
        for key, value in section.items():
            if isinstance(value, dict) and key not in ("per_stage", "options"):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    # the long vocabularies are shown by reference, secrets belong in the environment
    left_out = {"labels.objects", "labels.scenes", "labels.object_templates", "labels.scene_templates",
                "storage.key", "storage.secret", "storage.token"}
    written = set(keys(yaml.safe_load(path.read_text())))
    assert set(keys(RunConfig().to_dict())) - written == left_out


def test_videos_per_dataset_is_zero_or_more():
    assert RunConfig.from_dict({"resources": {"videos_per_dataset": 0}}).resources.videos_per_dataset == 0
    with pytest.raises(ConfigError, match="resources.videos_per_dataset"):
        RunConfig.from_dict({"resources": {"videos_per_dataset": -1}})


def test_label_names_templates_and_queries_are_each_taken_once_and_a_blank_name_is_refused():
    """A name twice (or twice but for spaces, which the tokenizer reads as one) took part of the
    softmax's probability twice: every other label scored lower, one fell out of the top k, and
    its rows came twice. A blank name became the prompt "a photo of a ." and a label '' row."""
    config = RunConfig.from_dict({
        "labels": {"objects": ["dog", "cat", "dog", "car", "  car  ", "tree"], "scenes": ["beach", "beach "],
                   "object_templates": ["a photo of a {}.", " a photo of a {}."]},
        "match": {"queries": ["a dog", " a dog ", "a cat"]}})
    assert config.labels.objects == ("dog", "cat", "car", "tree") and config.labels.scenes == ("beach",)
    assert config.labels.object_templates == ("a photo of a {}.",)
    assert config.match.queries == config.all_queries() == ("a dog", "a cat")
    for blank in (["dog", ""], ["dog", "  "]):
        with pytest.raises(ConfigError, match="labels.objects: an empty entry"):
            RunConfig.from_dict({"labels": {"objects": blank}})
    assert RunConfig.from_dict(config.to_dict()) == config  # (as stored in the runs table, read back)

"""`vidlens doctor`: what it reports of a configuration, and its verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import doctor


@pytest.fixture
def cheap_checks(monkeypatch):
    """The installation's checks (decoders, models, Ray, a pipeline run) as instant passes."""
    for name in ("_check_decoders", "_check_tiny_models"):
        monkeypatch.setattr(doctor, name, lambda root: "fine")
    monkeypatch.setattr(doctor, "_check_pipeline", lambda root, executor: "fine")
    for name in ("_check_shot_model", "_check_ocr"):
        monkeypatch.setattr(doctor, name, lambda: "fine")
    monkeypatch.setattr(doctor, "_check_gpu", lambda: "warning: no CUDA device visible")
    monkeypatch.setattr(doctor, "_check_ray", lambda executor: "fine")


def test_configured_models_that_cannot_load_fail_the_doctor(tmp_path, capsys, cheap_checks):
    # `vidlens run` with this configuration stops with exit 2: the doctor must not pass it
    config = tmp_path / "run.yaml"
    config.write_text(f"models:\n  embed: {tmp_path / 'no-such-model'}\n")
    assert doctor.run_doctor(str(config), executor="local") == 1
    out = capsys.readouterr().out
    assert "[FAIL] configured models" in out and "no-such-model" in out
    assert "doctor: 1 check(s) failed" in out


def test_a_model_folder_without_its_weights_fails_the_doctor(tmp_path, capsys, cheap_checks, tiny_models):
    # its config and processor load (all the run's preflight reads): the doctor passed it, and
    # `vidlens run` with it stopped at the model's load (exit 2)
    import shutil

    for role in ("embed", "captions"):
        broken = tmp_path / f"{role}-without-weights"
        shutil.copytree(tiny_models[role], broken)
        (broken / "model.safetensors").unlink()
        config = tmp_path / f"{role}.yaml"
        config.write_text(f"stages: [{'embed' if role == 'embed' else 'captions'}]\nmodels:\n  {role}: {broken}\n")
        assert doctor.run_doctor(str(config), executor="local") == 1
        out = capsys.readouterr().out
        assert "[FAIL] configured models" in out and f"cannot load the {role} model" in out and str(broken) in out, out
    config.write_text(f"stages: [embed, captions]\nmodels:\n  embed: {tiny_models['embed']}\n"
                      f"  captions: {tiny_models['captions']}\n  device: cuda\n")  # (workers' GPUs, not here)
    assert doctor.run_doctor(str(config), executor="local") == 0
    assert "(weights loaded, one forward pass)" in capsys.readouterr().out


def test_a_compiled_model_that_cannot_run_fails_the_doctor(tmp_path, capsys, cheap_checks, tiny_models):
    # models.compile on a machine without a C++ compiler passed the doctor, then failed every video
    import torch
    from torch._inductor import config as inductor

    config = tmp_path / "run.yaml"
    config.write_text(f"stages: [embed]\nmodels:\n  embed: {tiny_models['embed']}\n  compile: true\n")
    try:  # (inductor's own patch: a monkeypatch's undo deleted the setting, and later compiles failed)
        with inductor.patch({"cpp.cxx": (None, str(tmp_path / "no-such-compiler"))}):
            assert doctor.run_doctor(str(config), executor="local") == 1
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "[FAIL] configured models" in out and "forward pass failed with models.compile: true" in out, out
    assert "no-such-compiler" in out and "set models.compile: false" in out, out


@pytest.mark.parametrize("more", ["  device: mps\n", "match:\n  queries_file: {tmp}/no-such-queries.txt\n"],
                         ids=["a device this machine lacks", "a queries file not there"])
def test_a_configuration_the_run_would_stop_on_fails_the_doctor(tmp_path, capsys, cheap_checks, tiny_models, more):
    # the doctor passed these, and `vidlens run` with them exited 2
    import torch

    if "mps" in more and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    config = tmp_path / "run.yaml"
    config.write_text(f"models:\n  embed: {tiny_models['embed']}\n  captions: {tiny_models['captions']}\n"
                      + more.format(tmp=tmp_path))
    assert doctor.run_doctor(str(config), executor="local") == 1
    out = capsys.readouterr().out
    assert "[FAIL] configured models" in out and ("no-such-queries.txt" in out or "'mps'" in out), out


def test_warnings_are_counted_in_the_verdict(capsys, cheap_checks):
    assert doctor.run_doctor(executor="local") == 0
    assert "doctor: all checks passed, 1 with a warning" in capsys.readouterr().out


def test_loading_a_model_prints_no_progress_bar_but_downloads_still_would(tiny_models, capsys):
    # "Loading weights: 100%" came into every run's log, once per model and worker
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers import CLIPModel

    from schemas.config import ModelsConfig
    from workers.models import load_pretrained

    load_pretrained(CLIPModel, tiny_models["embed"], ModelsConfig(), "embed")
    assert "Loading weights" not in capsys.readouterr().err
    assert not are_progress_bars_disabled()  # the hub's download bars


def test_a_configuration_that_does_not_load_is_said_before_the_checks(tmp_path, monkeypatch):
    from schemas.config import ConfigError

    config = tmp_path / "run.yaml"
    config.write_text("captions:\n  num_beams: 0\n")
    monkeypatch.setattr(doctor, "_check_decoders", lambda root: pytest.fail("the checks ran first"))
    with pytest.raises(ConfigError, match="num_beams"):
        doctor.run_doctor(str(config), executor="local")
    config.write_text("resources:\n  per_stage: {captions: {num_gpuz: 1}}\n")  # a run refuses it when planning
    with pytest.raises(ValueError, match=f"--config {config}: resources.per_stage.captions.num_gpuz: unknown"):
        doctor.run_doctor(str(config), executor="local")


@pytest.mark.parametrize("keep, said", [("file", "is a file, not a folder"), ("/proc/vidlens-doctor", "cannot be made")])
def test_a_kept_folder_that_cannot_be_one_is_named(keep, said, tmp_path, capsys, cheap_checks):
    from pipeline.cli import main

    if keep == "file":
        keep = str(tmp_path / "notes.txt")
        Path(keep).write_text("not a folder")
    # a bare "[Errno 17] File exists" (or 1, 20) named neither --keep nor what to do
    assert main(["doctor", "--executor", "local", "--keep", keep]) == 2
    assert f"--keep {keep!r} {said}" in capsys.readouterr().err


def test_the_pipeline_check_passes_again_in_a_kept_folder(tmp_path):
    # `doctor --keep DIR` a second time read every run's rows: 6 shots in cuts.mp4, and it failed
    for _ in range(2):
        assert "3 synthetic clips in" in doctor._check_pipeline(tmp_path, "local")

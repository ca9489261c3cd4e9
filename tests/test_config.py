"""Typed configs: one strict base, and flags generated from the fields (no Ray, no models)."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from medray.config import StrictModel, add_arguments, values_from_args
from medray.infer import MAX_NEW_TOKENS, InferConfig, add_infer_arguments, infer_config_from_args
from medray.serve.config import ServeConfig
from medray.serve.jobs import JOB_FIELDS, JobRequest
from medray.train import TrainArgs


def _parse(argv: list[str]) -> InferConfig:
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    return infer_config_from_args(parser.parse_args(argv))


def test_infer_flags_are_the_config_fields():
    cfg = _parse(["--model", "tiny://llava-mistral", "--input", "s3://b/in/", "--output", "s3://b/out/",
                  "--task", "vqa", "--stop", "###", "--stop", "\n", "--max-new-tokens", "7", "--image-folder", "/img"])
    assert (cfg.task, cfg.stop, cfg.max_new_tokens, cfg.image_folder, cfg.experts) == ("vqa", ("###", "\n"), 7,
                                                                                       "/img", None)
    assert cfg.batch_size == InferConfig.model_fields["batch_size"].default  # unset flags keep defaults
    experts = _parse(["--model", "m", "--input", "i", "--output", "o", "--experts", "--plot-expert", "p"])
    assert experts.experts.plot == "p" and experts.experts.radiology == "tiny://git"
    parser = argparse.ArgumentParser()
    add_infer_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert set(InferConfig.model_fields) - {"experts"} <= flags
    helps = {a.dest: a.help for a in parser._actions}
    assert "greedy" in helps["temperature"]  # descriptions come from the field docstrings


def test_flags_are_typed_and_checked_by_the_model():
    with pytest.raises(SystemExit):  # argparse refuses a bad choice
        _parse(["--model", "m", "--input", "i", "--output", "o", "--task", "translate"])
    with pytest.raises(ValidationError, match="max_new_tokens"):
        _parse(["--model", "m", "--input", "i", "--output", "o", "--max-new-tokens", str(MAX_NEW_TOKENS + 1)])


def test_job_requests_are_a_declared_subset_of_infer_options():
    assert set(JOB_FIELDS) <= set(InferConfig.model_fields)
    for name in JOB_FIELDS:  # same types, limits and descriptions
        assert JobRequest.model_fields[name].description == InferConfig.model_fields[name].description
    with pytest.raises(ValidationError, match="max_new_tokens"):
        JobRequest(model="m", input="i", output="o", max_new_tokens=MAX_NEW_TOKENS + 1)
    with pytest.raises(ValidationError, match="gpus_per_actor"):  # resources are the server's to set
        JobRequest(model="m", input="i", output="o", gpus_per_actor=8)


def test_generation_settings_are_declared_once():
    """Every place that takes a generation setting takes GenerationFields' own field (default,
    bounds, description): a new setting is one field there, and a rerun with another value of
    it refuses (ANSWER_FIELDS), whatever the setting."""
    from medray.cli import build_parser
    from medray.infer.pipeline import ANSWER_FIELDS
    from medray.engines.types import GENERATION_FIELDS, GenerationFields, GenerationSettings
    from medray.serve.openai_api import OPENAI_NAMED, ChatRequest

    declared = GenerationFields.model_fields
    assert set(GENERATION_FIELDS) == set(declared) and set(GENERATION_FIELDS) <= ANSWER_FIELDS
    for model, names in ((InferConfig, GENERATION_FIELDS), (JobRequest, GENERATION_FIELDS),
                         (GenerationSettings, GENERATION_FIELDS),
                         (ChatRequest, [n for n in GENERATION_FIELDS if n not in OPENAI_NAMED])):
        for name in names:
            mine, theirs = model.model_fields[name], declared[name]
            assert (mine.annotation, mine.default, mine.description, mine.metadata) == \
                   (theirs.annotation, theirs.default, theirs.description, theirs.metadata), (model, name)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("infer", "ask"):
        assert set(GENERATION_FIELDS) <= {a.dest for a in sub.choices[command]._actions}, command
    ask = sub.choices["ask"].parse_args(["--model", "m", "--question", "q", "--stop", "a", "--top-p", "0.5"])
    assert GenerationSettings(**values_from_args(GenerationSettings, ask)) == GenerationSettings(stop=("a",), top_p=0.5)
    # The OpenAI request's own names for the other two.
    body = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=9, stop="###", seed=3)
    assert body.to_settings(default_max_tokens=256, limit=512) == GenerationSettings(max_new_tokens=9, stop=("###",),
                                                                                      seed=3)
    assert ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}]).to_settings(
        default_max_tokens=256, limit=100).max_new_tokens == 100
    # Equal settings are equal, hashable objects (a replica groups its batch by them), and frozen.
    assert len({GenerationSettings(stop=("a",)), InferConfig(model="m", input="i", output="o", stop=["a"]).settings}) == 1
    with pytest.raises(ValidationError):
        GenerationSettings().temperature = 1.0


def test_one_strict_base():
    for model in (InferConfig, JobRequest, ServeConfig, TrainArgs):
        assert issubclass(model, StrictModel)
        with pytest.raises(ValidationError, match="bogus"):
            model.model_validate({"bogus": 1})


def test_train_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainArgs, positional=("manifest",))
    args = TrainArgs.model_validate(values_from_args(TrainArgs, parser.parse_args(["m.yaml", "--set", "a=1"])))
    assert (args.manifest, args.set) == ("m.yaml", ["a=1"])
    assert TrainArgs.model_validate(values_from_args(TrainArgs, parser.parse_args(["m.yaml"]))).set == []

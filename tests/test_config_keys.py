"""Typed config keys per family: a run carries its family's keys only, the family is chosen after
``--config`` and every ``--set``, and configs saved by earlier versions (every family's keys in
every run) still load and resume without reporting the other families' keys."""

from __future__ import annotations

import dataclasses

import pytest

from fraqat_jax.family import ConfigError, family_for_teacher, keys_of
from fraqat_jax.recipe import config as rc
from fraqat_jax.train import __main__ as train_cli
from fraqat_jax.train.loop import config_changes

TEXT_ONLY = ("seq_len", "sample_tokens", "loss")
IMAGE_ONLY = ("image_size", "num_train_timesteps", "logit_mean", "logit_std", "sample_steps", "guidance_scale")


def test_each_key_is_a_typed_field_with_help():
    for cls in (rc.TrainConfig, family_for_teacher("builtin").Config, family_for_teacher("builtin:lm").Config):
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        for key in keys_of(cls).values():
            assert key.help and type(key.default) in (str, int, float, bool), key


def test_the_default_run_has_image_keys_only_and_help_lists_no_text_key(capsys):
    cfg = rc.load_config()
    assert all(k in cfg for k in IMAGE_ONLY) and not any(k in cfg for k in TEXT_ONLY)
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = capsys.readouterr().out
    assert "image_size = 0" in text and "seq_len" not in text and "sample_tokens" not in text


def test_the_family_is_chosen_after_every_set():
    cfg = rc.load_config(None, ["seq_len=32", "teacher=builtin:lm", "data=datafree"])
    assert family_for_teacher(cfg.teacher).name == "gemma2" and cfg.seq_len == 32
    assert not any(k in cfg for k in IMAGE_ONLY)
    with pytest.raises(ConfigError, match=r"unknown config key 'seq_len' in --set for a dit run .*gemma2"):
        rc.load_config(None, ["seq_len=32"])
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        rc.load_config(None, ["nope=1", "teacher=builtin:lm"])
    with pytest.raises(ConfigError, match=r"sample_tokens=0 is not allowed: use a positive integer"):
        rc.load_config(None, ["teacher=builtin:lm", "data=datafree", "sample_tokens=0"])
    with pytest.raises(ConfigError, match=r"schedule='nope' is not allowed"):
        rc.load_config(None, ["schedule=nope"])


def test_a_config_saved_with_every_familys_keys_loads_and_resumes_unchanged():
    saved = {**rc.get_config().to_dict(), "seq_len": 128, "loss": "kl", "sample_tokens": 32, "act_quant": "dynamic"}
    saved.pop("act_ranges")
    upgraded = rc.upgrade_saved(saved)
    assert not any(k in upgraded for k in TEXT_ONLY) and upgraded["act_ranges"] == "dynamic"
    cfg = rc.load_config(base=upgraded)
    assert config_changes(upgraded, cfg.to_dict()) == {}
    assert config_changes(upgraded, {**cfg.to_dict(), "steps": 7}) == {"steps": (cfg.steps, 7)}

"""The prompt-cache format (``fraqat_jax.data.latents.write_prompts`` / ``read_prompts``) and
``scripts/cache_latents.py --random``. The ``--pipeline`` and ``--prompts`` modes are tested against
diffusers on tiny offline pipelines in ``tests/eval/test_t2i.py``, whose run uses their caches."""

import importlib.util
import json
import os

import numpy as np
import pytest

from fraqat_jax.data import DataSourceError, read_latents
from fraqat_jax.data.latents import read_prompts, write_prompts

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "cache_latents.py")


def _script():
    spec = importlib.util.spec_from_file_location("cache_latents", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_cache_round_trip_and_refusals(tmp_path):
    rng = np.random.default_rng(0)
    cond = {"encoder_hidden_states": rng.standard_normal((2, 3, 4)).astype(np.float16),
            "encoder_attention_mask": np.array([[1, 1, 0], [1, 0, 0]], np.int32)}
    null = {"encoder_hidden_states": np.ones((1, 3, 4), np.float16), "encoder_attention_mask": np.array([[1, 0, 0]], np.int32)}
    write_prompts(str(tmp_path / "c"), cond, null, ["a cat", "a dog"], info={"pipeline": "p"})
    got = read_prompts(str(tmp_path / "c"))
    assert got.prompts == ["a cat", "a dog"] and got.info["pipeline"] == "p" and got.info["mode"] == "prompts"
    np.testing.assert_array_equal(got.cond["encoder_hidden_states"][:], cond["encoder_hidden_states"].astype(np.float32))
    assert got.cond["encoder_hidden_states"][:].dtype == np.float32 and got.cond["encoder_attention_mask"].dtype == np.int32
    np.testing.assert_array_equal(got.null["encoder_attention_mask"], null["encoder_attention_mask"])
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["format"] == "fraqat-latents-v1" and "latents" not in meta["fields"]
    with pytest.raises(DataSourceError, match="prompt cache"):  # not training data, and it says so
        read_latents(str(tmp_path / "c"))
    os.remove(tmp_path / "c" / "null" / "meta.json")
    with pytest.raises(DataSourceError, match="null.*meta.json"):
        read_prompts(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="same conditioning fields"):
        write_prompts(str(tmp_path / "d"), cond, {}, ["a", "b"])
    with pytest.raises(ValueError, match="one empty-prompt row"):
        write_prompts(str(tmp_path / "d"), cond, cond, ["a", "b"])


def test_a_training_cache_is_not_a_prompt_cache(tmp_path):
    _script().main(["--random", "3", "--preset", "SD3.5-Medium", "--size", "64", "--out", str(tmp_path / "r")])
    src = read_latents(str(tmp_path / "r"))
    assert src.element_spec["latents"][0] == (16, 8, 8) and src.element_spec["pooled_projections"][0] == (2048,)
    with pytest.raises(DataSourceError, match="not a prompt cache"):
        read_prompts(str(tmp_path / "r"))

"""Data sources: determinism by position, per-host rows, the shipped digits, TFDS (mock data),
the cached-latents format, the data-free source."""

import numpy as np
import pytest

from fraqat_jax.data import DataFreeSource, LatentsWriter, digits, make_source, read_latents, write_latents
from fraqat_jax.data.sources import epoch_permutation, global_indices


def test_digits_match_the_uci_data():
    src = digits(seed=0)
    assert src.num_examples == 1797
    x, y = src.arrays["latents"], src.arrays["class_labels"]
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    # pixels 0..16 mapped to [-1, 1]; classes 0..9 about 180 each (sklearn's counts)
    np.testing.assert_allclose(sorted(np.unique(x)), np.arange(17) / 8.0 - 1.0)
    np.testing.assert_array_equal(np.bincount(y), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    # the first sklearn digit is a 0 whose top row is 0 0 5 13 9 1 0 0
    np.testing.assert_allclose((x[0, 0, 0] + 1) * 8, [0, 0, 5, 13, 9, 1, 0, 0])
    assert y[0] == 0


def test_positions_cover_each_epoch_once_and_are_deterministic():
    src = digits(seed=3)
    n, b = src.num_examples, 100
    idx = np.concatenate([global_indices(3, p, b, n) for p in range(18)])  # 1800 = 1 epoch + 3
    np.testing.assert_array_equal(np.sort(idx[:n]), np.arange(n))
    np.testing.assert_array_equal(idx[n:], epoch_permutation(3, 1, n)[:3])
    a, c = src.batch(7, 32), digits(seed=3).batch(7, 32)
    for k in a:
        np.testing.assert_array_equal(a[k], c[k])
    assert not np.array_equal(digits(seed=4).batch(7, 32)["class_labels"], a["class_labels"])


def test_hosts_read_disjoint_rows_of_the_global_batch():
    src = digits(seed=0)
    whole = src.batch(5, 24)
    parts = [src.batch(5, 24, host_index=h, host_count=4) for h in range(4)]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    with pytest.raises(ValueError, match="not divisible by the host count 5"):
        src.batch(0, 24, host_index=0, host_count=5)


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        src = make_source("tfds:mnist:train", seed=0, image_size=8)
        assert src.num_examples == 40
        assert src.element_spec["latents"][0] == (1, 8, 8)
        whole = src.batch(2, 8)
        assert whole["latents"].shape == (8, 1, 8, 8) and whole["latents"].dtype == np.float32
        assert whole["latents"].min() >= -1.0 and whole["latents"].max() <= 1.0
        # per-host sharding: each host reads its own rows of the same global batch
        halves = [src.batch(2, 8, host_index=h, host_count=2) for h in range(2)]
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])
        # the rows are the dataset's examples at the global indices, resized from 28x28
        raw = tfds.data_source("mnist", split="train")
        idx = global_indices(0, 2, 8, 40)
        labels = [int(raw[int(i)]["label"]) for i in idx]
        np.testing.assert_array_equal(whole["class_labels"], labels)
        full = make_source("tfds:mnist", seed=0)
        img = np.asarray(raw[int(idx[0])]["image"], np.float32)[..., 0] / 127.5 - 1
        np.testing.assert_allclose(full.batch(2, 8)["latents"][0, 0], img, atol=1e-6)
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ValueError, match="no feature 'pixels'"):
            make_source("tfds:mnist", seed=0).__class__("mnist", image_key="pixels")


def test_latents_cache_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    lat = rng.normal(size=(10, 4, 8, 8)).astype(np.float16)
    ehs = rng.normal(size=(10, 7, 16)).astype(np.float16)
    pooled = rng.normal(size=(10, 32)).astype(np.float32)
    w = LatentsWriter(str(tmp_path / "c"), 10, {"latents": ((4, 8, 8), np.float16),
                                                "encoder_hidden_states": ((7, 16), np.float16),
                                                "pooled_projections": ((32,), np.float32)}, info={"model": "test"})
    w.write(0, {"latents": lat[:6], "encoder_hidden_states": ehs[:6], "pooled_projections": pooled[:6]})
    w.write(6, {"latents": lat[6:], "encoder_hidden_states": ehs[6:], "pooled_projections": pooled[6:]})
    w.close()
    src = make_source(f"latents:{tmp_path / 'c'}", seed=1)
    assert src.info == {"model": "test"}
    b = src.batch(0, 4)
    idx = global_indices(1, 0, 4, 10)
    np.testing.assert_array_equal(b["latents"], lat[idx].astype(np.float32))
    np.testing.assert_array_equal(b["encoder_hidden_states"], ehs[idx].astype(np.float32))
    np.testing.assert_array_equal(b["pooled_projections"], pooled[idx])
    assert b["latents"].dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        w2 = LatentsWriter(str(tmp_path / "d"), 2, {"latents": ((4, 8, 8), np.float16)})
        w2.write(0, {"latents": np.zeros((2, 4, 4, 4))})
    with pytest.raises(ValueError, match="no meta.json"):
        read_latents(str(tmp_path / "d"))  # never closed: incomplete
    write_latents(str(tmp_path / "e"), {"latents": lat, "class_labels": np.arange(10)})
    np.testing.assert_array_equal(read_latents(str(tmp_path / "e")).arrays["class_labels"][:], np.arange(10))


def test_datafree_source_is_deterministic_and_host_sharded():
    import jax

    def generate(key, n):
        return {"latents": jax.random.normal(key, (n, 1, 4, 4)), "class_labels": jax.random.randint(key, (n,), 0, 10)}

    src = DataFreeSource(generate, {"latents": ((1, 4, 4), np.float32), "class_labels": ((), np.int32)}, seed=5)
    a, b = src.batch(3, 8), src.batch(3, 8)
    np.testing.assert_array_equal(a["latents"], b["latents"])
    assert not np.array_equal(a["latents"], src.batch(4, 8)["latents"])
    halves = [src.batch(3, 8, host_index=h, host_count=2) for h in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["latents"] for h in halves]), a["latents"])


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="data source 'imagenet' is not allowed"):
        make_source("imagenet")

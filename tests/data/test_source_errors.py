"""A data source that cannot be opened (or does not fit the teacher) raises one DataSourceError: one
line that names the source and says what to do; the trainer's CLI turns it into exit status 2."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from fraqat_jax.data import (
    DataSourceError,
    LatentsWriter,
    check_fits_teacher,
    make_source,
    write_latents,
)

tfds = pytest.importorskip("tensorflow_datasets")

# The shipped digits DiT: 1 channel, patch_size 2, any multiple of 2 per side.
DIGITS_DIT = {"_class_name": "DiTTransformer2DModel", "in_channels": 1, "patch_size": 2, "sample_size": 8}


def _one_line(error: DataSourceError, source: str) -> str:
    message = str(error)
    assert "\n" not in message and f"data source {source!r}" in message, message
    return message


class TinyImagesForErrors(tfds.core.GeneratorBasedBuilder):
    """Five 6x6 one-channel images, pixel value 40 * i, label i % 3 (prepared as array_record)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(6, 6, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            yield i, {"image": np.full((6, 6, 1), 40 * i, np.uint8), "label": i % 3}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    TinyImagesForErrors(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_unknown_tfds_name_says_to_prepare_it_into_data_dir(tmp_path):
    with pytest.raises(DataSourceError) as info:
        make_source("tfds:nonexistent_ds", data_dir=str(tmp_path))
    message = _one_line(info.value, "tfds:nonexistent_ds:train")
    assert "no dataset 'nonexistent_ds'" in message and "prepare it into data_dir first" in message
    assert f"--data_dir {tmp_path}" in message


def test_registered_tfds_dataset_not_prepared_is_not_downloaded(tmp_path, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(DataSourceError) as info:
        make_source("tfds:mnist", data_dir=str(tmp_path))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # the one line only
    message = _one_line(info.value, "tfds:mnist:train")
    assert f"is not prepared in data_dir {tmp_path}" in message
    assert f"tfds build mnist --data_dir {tmp_path} --file_format array_record" in message
    downloaded = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert downloaded == []  # nothing fetched or generated: a pod's hosts must not all prepare it at once


def test_prepared_tfds_dataset_opens_and_a_missing_split_is_named(prepared_dir):
    src = make_source("tfds:tiny_images_for_errors", data_dir=prepared_dir, seed=3)
    rows = src.batch(0, 5)
    pixel = rows["latents"][:, 0, 0, 0]  # the example index i is recoverable from its pixel 40 * i
    index = np.rint((pixel + 1) * 127.5 / 40).astype(int)
    np.testing.assert_allclose(pixel, 40 * index / 127.5 - 1, atol=1e-6)
    assert sorted(index) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(rows["class_labels"], index % 3)
    with pytest.raises(DataSourceError) as info:
        make_source("tfds:tiny_images_for_errors:valid", data_dir=prepared_dir)
    assert "has no split 'valid'; its splits: train" in _one_line(info.value, "tfds:tiny_images_for_errors:valid")


def test_latents_folder_problems_each_name_the_source(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataSourceError, match="no such folder"):
        make_source(f"latents:{missing}")
    unfinished = tmp_path / "unfinished"
    LatentsWriter(str(unfinished), 2, {"latents": ((1, 4, 4), np.float16)})  # never closed: no index
    with pytest.raises(DataSourceError) as info:
        make_source(f"latents:{unfinished}")
    assert "has no meta.json" in _one_line(info.value, f"latents:{unfinished}")
    broken = tmp_path / "broken"
    write_latents(str(broken), {"latents": np.zeros((3, 1, 4, 4), np.float32)})
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(DataSourceError) as info:
        make_source(f"latents:{broken}")
    assert "meta.json is not a fraqat-latents-v1 index" in _one_line(info.value, f"latents:{broken}")
    lost = tmp_path / "lost"
    write_latents(str(lost), {"latents": np.zeros((3, 1, 4, 4), np.float32), "class_labels": np.arange(3)})
    (lost / "class_labels.npy").unlink()
    with pytest.raises(DataSourceError) as info:
        make_source(f"latents:{lost}")
    assert "field 'class_labels' cannot be read" in _one_line(info.value, f"latents:{lost}")


def test_fit_check_agrees_with_what_the_teacher_takes():
    """The check accepts exactly the sizes the digits DiT runs on (traced with eval_shape)."""
    import jax.numpy as jnp
    from flax import nnx

    from fraqat_jax.models import DiTTransformer2DModel

    config = {**DIGITS_DIT, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 4,
              "num_embeds_ada_norm": 10, "norm_num_groups": 1, "out_channels": 1}
    model = nnx.eval_shape(lambda: DiTTransformer2DModel(config, rngs=nnx.Rngs(0)))
    for size in (6, 7, 8, 9):
        spec = {"latents": ((1, size, size), np.float32)}
        try:
            nnx.eval_shape(lambda m, x: m(x, jnp.ones(1), jnp.zeros(1, jnp.int32)), model,
                           jnp.zeros((1, 1, size, size)))
            runs = True
        except Exception:
            runs = False
        try:
            check_fits_teacher("tfds:mnist", spec, config, family="dit")
            accepted = True
        except DataSourceError as e:
            accepted = False
            assert "multiple of 2" in _one_line(e, "tfds:mnist") and "set image_size" in str(e)
        assert accepted == runs == (size % 2 == 0), size


def test_fit_check_channels_pos_embed_and_flux_packing():
    with pytest.raises(DataSourceError) as info:
        check_fits_teacher("tfds:cifar10", {"latents": ((3, 8, 8), np.float32)}, DIGITS_DIT, family="dit")
    assert "3 channels but the dit teacher takes 1" in _one_line(info.value, "tfds:cifar10")
    sd3 = {"in_channels": 16, "patch_size": 2, "pos_embed_max_size": 8}
    check_fits_teacher("latents:/c", {"latents": ((16, 16, 16), np.float32)}, sd3, family="sd3")
    with pytest.raises(DataSourceError) as info:
        check_fits_teacher("latents:/c", {"latents": ((16, 18, 16), np.float32)}, sd3, family="sd3")
    assert "at most 16 per side" in _one_line(info.value, "latents:/c") and "cache latents" in str(info.value)
    flux = {"in_channels": 64, "patch_size": 1}
    check_fits_teacher("latents:/f", {"latents": ((16, 8, 8), np.float32)}, flux, family="flux", packed=True)
    with pytest.raises(DataSourceError, match="must be a multiple of 2 .the 2x2 packing"):
        check_fits_teacher("latents:/f", {"latents": ((16, 7, 8), np.float32)}, flux, family="flux", packed=True)
    with pytest.raises(DataSourceError, match="takes 16 .in_channels=64, packed 2x2"):
        check_fits_teacher("latents:/f", {"latents": ((64, 8, 8), np.float32)}, flux, family="flux", packed=True)


def test_cli_exits_2_with_one_line_for_an_unknown_tfds_dataset(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    proc = subprocess.run([sys.executable, "-m", "fraqat_jax.train", "--workdir", str(tmp_path / "run"),
                           "--set", "data=tfds:nonexistent_ds"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: data source 'tfds:nonexistent_ds:train'")
    assert "prepare it into data_dir first" in lines[0]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")  # no training step ran

"""Inception-v3 (FID) port: shapes via eval_shape, weight files read without torch, block parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fraqat_jax.eval import inception

torch = pytest.importorskip("torch")
F = torch.nn.functional


def abstract_model():
    return nnx.eval_shape(lambda: inception.InceptionV3(rngs=nnx.Rngs(0)))


def test_pool3_shape_and_parameter_count():
    model = abstract_model()
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((2, 1, 8, 8), jnp.float32))
    assert out.shape == (2, inception.FEATURE_DIM)  # resized to 299 x 299, gray repeated to RGB
    # pytorch-fid's FID Inception without its fc layer: 21.8M numbers incl. batch-norm statistics
    assert sum(v.size for v in jax.tree.leaves(state)) == 21_820_000
    with pytest.raises(ValueError, match="at least 75x75"):
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, resize=False), state,
                       jax.ShapeDtypeStruct((1, 3, 32, 32), jnp.float32))


def fake_state_dict(rng):
    """Random tensors under pytorch-fid's key names (shapes in torch layout), plus an fc layer."""
    sd = {}
    for path, shape in inception._parameter_shapes().items():
        *mod, leaf = path
        name = ".".join(mod)
        if leaf == "kernel":
            h, w, i, o = shape
            sd[name + ".weight"] = rng.standard_normal(size=(o, i, h, w), dtype=np.float32)
        else:
            torch_leaf = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[leaf]
            sd[f"{name}.{torch_leaf}"] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        if leaf == "var":
            sd[f"{name}.num_batches_tracked"] = np.array(0, np.int64)
    sd["fc.weight"] = rng.standard_normal(size=(1008, 2048), dtype=np.float32)
    sd["fc.bias"] = np.zeros(1008, np.float32)
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    sd = fake_state_dict(np.random.default_rng(0))
    d = tmp_path_factory.mktemp("w")
    np.savez(d / "w.npz", **sd)
    # torch files: a few real keys (the reader does not care how many), one of them non-contiguous
    some = ["Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var",
            "Mixed_7c.branch_pool.bn.num_batches_tracked", "fc.weight"]
    small = {k: torch.from_numpy(sd[k]) for k in some}
    small["t"] = torch.arange(6.0).reshape(2, 3).t()
    torch.save(small, d / "zip.pth")
    torch.save(small, d / "legacy.pth", _use_new_zipfile_serialization=False)
    return sd, d


@pytest.mark.parametrize("name", ["zip.pth", "legacy.pth"])
def test_torch_files_read_without_torch(weights, name):
    sd, d = weights
    got = inception.load_torch_state_dict(str(d / name))
    assert set(got) == {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var",
                        "Mixed_7c.branch_pool.bn.num_batches_tracked", "fc.weight", "t"}
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.weight"):
        np.testing.assert_array_equal(got[k], sd[k])
    assert got["Mixed_7c.branch_pool.bn.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(got["t"], np.arange(6.0).reshape(2, 3).T)  # rebuilt from its strides


def torch_basic(sd, name, x, stride=1, padding=0):
    y = F.conv2d(x, torch.from_numpy(sd[name + ".conv.weight"]), stride=stride, padding=padding)
    bn = lambda s: torch.from_numpy(sd[f"{name}.bn.{s}"])  # noqa: E731
    y = F.batch_norm(y, bn("running_mean"), bn("running_var"), bn("weight"), bn("bias"), False, 0.0, 1e-3)
    return F.relu(y)


def test_loaded_block_matches_torch_reference(weights):
    sd, d = weights
    model = inception.load_inception(str(d / "w.npz"))
    x = np.random.default_rng(1).normal(size=(2, 192, 7, 7)).astype(np.float32)
    # Mixed_5b (InceptionA, FID variant: average pool excluding padding) written out in torch
    t = torch.from_numpy(x)
    b1 = torch_basic(sd, "Mixed_5b.branch1x1", t)
    b5 = torch_basic(sd, "Mixed_5b.branch5x5_2", torch_basic(sd, "Mixed_5b.branch5x5_1", t), padding=2)
    b3 = torch_basic(sd, "Mixed_5b.branch3x3dbl_1", t)
    b3 = torch_basic(sd, "Mixed_5b.branch3x3dbl_3", torch_basic(sd, "Mixed_5b.branch3x3dbl_2", b3, padding=1), padding=1)
    bp = torch_basic(sd, "Mixed_5b.branch_pool", F.avg_pool2d(t, 3, 1, 1, count_include_pad=False))
    want = torch.cat([b1, b5, b3, bp], 1).numpy()
    graphdef, state = nnx.split(model.Mixed_5b)
    got = jax.jit(lambda st, v: nnx.merge(graphdef, st)(v))(state, jnp.transpose(jnp.asarray(x), (0, 2, 3, 1)))
    got = np.transpose(np.asarray(got), (0, 3, 1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_bad_weight_files(weights, tmp_path):
    sd, _ = weights
    np.savez(tmp_path / "short.npz", **{"Mixed_6b.branch1x1.conv.weight": sd["Mixed_6b.branch1x1.conv.weight"]})
    with pytest.raises(ValueError, match="lacks 469"):
        inception.load_inception(str(tmp_path / "short.npz"))
    np.savez(tmp_path / "bad.npz", **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        inception.load_inception(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "odd.npz", **{"Mixed_5b.branch1x1.linear.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="unexpected key"):
        inception.load_inception(str(tmp_path / "odd.npz"))
    with pytest.raises(FileNotFoundError):
        inception.load_inception(str(tmp_path / "none.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        inception.load_inception(str(tmp_path / "junk.pth"))

"""Inception-v3 for FID, in Flax NNX: the ``pt_inception-2015-12-05`` network of pytorch-fid.

The FID variant differs from torchvision's Inception-v3 in its pooling branches (average pools that
exclude the padding, a max pool in the last block), which this port copies. It returns the 2048
``pool3`` features (the global average pool after ``Mixed_7c``) that FID is defined on.

Weights are never downloaded: the user supplies the standard FID weights as a file
(``--inception-weights PATH``), one of

- the pytorch-fid state dict ``pt_inception-2015-12-05-6726825d.pth`` (read without torch, both
  torch's zip and legacy serialisation formats),
- an ``.npz`` or ``.safetensors`` file holding the same keys (``Conv2d_1a_3x3.conv.weight``,
  ``Mixed_5b.branch1x1.bn.running_mean``, ...).

Module paths copy the torch names (``Mixed_5b.branch5x5_2.conv.kernel``), so the mapping is
``weight -> kernel`` (OIHW -> HWIO) for convolutions and ``weight, bias, running_mean, running_var ->
scale, bias, mean, var`` for batch norms. The final ``fc`` layer is not needed for pool3 and ignored.
"""

from __future__ import annotations

import collections
import functools
import os
import pickle
import zipfile
from functools import partial

import flax.linen as nn_pool
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

FEATURE_DIM = 2048
INPUT_SIZE = 299


class BasicConv2d(nnx.Module):
    """Convolution without bias, batch norm (eps 1e-3, running statistics), ReLU. NHWC."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.conv = nnx.Conv(
            cin, cout, kernel, stride, padding=[(p, p) for p in padding], use_bias=False, rngs=rngs
        )
        self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    return nn_pool.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride):
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn_pool.max_pool(x, (3, 3), (stride, stride), pad)


class InceptionA(nnx.Module):
    def __init__(self, cin, pool_features, *, rngs):
        c = partial(BasicConv2d, rngs=rngs)
        self.branch1x1 = c(cin, 64, 1)
        self.branch5x5_1 = c(cin, 48, 1)
        self.branch5x5_2 = c(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, padding=1)
        self.branch_pool = c(cin, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    def __init__(self, cin, *, rngs):
        c = partial(BasicConv2d, rngs=rngs)
        self.branch3x3 = c(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = c(cin, 64, 1)
        self.branch3x3dbl_2 = c(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = c(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    def __init__(self, cin, c7, *, rngs):
        c = partial(BasicConv2d, rngs=rngs)
        self.branch1x1 = c(cin, 192, 1)
        self.branch7x7_1 = c(cin, c7, 1)
        self.branch7x7_2 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = c(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = c(cin, c7, 1)
        self.branch7x7dbl_2 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = c(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = c(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = c(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    def __init__(self, cin, *, rngs):
        c = partial(BasicConv2d, rngs=rngs)
        self.branch3x3_1 = c(cin, 192, 1)
        self.branch3x3_2 = c(192, 320, 3, stride=2)
        self.branch7x7x3_1 = c(cin, 192, 1)
        self.branch7x7x3_2 = c(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = c(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = c(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """``max_pool_branch=False``: pytorch-fid's ``FIDInceptionE_1`` (average pool without padding),
    ``True``: ``FIDInceptionE_2`` (max pool)."""

    def __init__(self, cin, max_pool_branch, *, rngs):
        c = partial(BasicConv2d, rngs=rngs)
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = c(cin, 320, 1)
        self.branch3x3_1 = c(cin, 384, 1)
        self.branch3x3_2a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = c(cin, 448, 1)
        self.branch3x3dbl_2 = c(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = c(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = c(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = c(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _max_pool_3x3(x, 1) if self.max_pool_branch else _avg_pool_3x3(x)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """FID Inception-v3. ``model(images) -> (B, 2048)`` pool3 features.

    ``images``: ``(B, 3, H, W)`` (diffusers/torch layout) with values in ``[-1, 1]``; single-channel
    images are repeated to RGB. With ``resize=True`` (FID's protocol) they are resized bilinearly
    to 299x299 first (as pytorch-fid does, ``align_corners=False``, no antialiasing); without it
    ``H, W`` must be at least 75.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        c = partial(BasicConv2d, rngs=rngs)
        self.Conv2d_1a_3x3 = c(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = c(32, 32, 3)
        self.Conv2d_2b_3x3 = c(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = c(64, 80, 1)
        self.Conv2d_4a_3x3 = c(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, True, rngs=rngs)

    def __call__(self, images: jax.Array, *, resize: bool = True) -> jax.Array:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be (B, 1 or 3, H, W), got shape {images.shape}")
        x = jnp.transpose(images.astype(jnp.float32), (0, 2, 3, 1))
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        if resize:
            x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear", antialias=False)
        elif min(x.shape[1:3]) < 75:
            raise ValueError(f"images must be at least 75x75 without resize, got {x.shape[1:3]}")
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3(x, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool_3x3(x, 2)
        for block in (
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
            self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c,
        ):  # fmt: skip
            x = block(x)
        return x.mean(axis=(1, 2))


# ---------------------------------------------------------------- weight files


_TORCH_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.data = np.dtype(dtype), numel, None


class _LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        item = self.storage.dtype.itemsize
        flat = self.storage.data
        if not self.size:
            return np.array(flat[self.offset])
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], self.size, tuple(s * item for s in self.stride), writeable=False
        )
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into lazy tensors; refuses every other global (no code runs)."""

    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a torch weight file")

    def persistent_load(self, pid):
        if pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[0]!r}")
        dtype, key, numel = pid[1], str(pid[2]), pid[4]
        if key not in self.storages:
            self.storages[key] = _Storage(dtype, numel)
        storage = self.storages[key]
        if len(pid) > 5 and pid[5] is not None:  # legacy storage view: (view_key, offset, size)
            raise pickle.UnpicklingError("torch storage views are not supported")
        return storage


def _resolve(obj):
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    return obj


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a ``torch.save``'d state dict (zip or legacy format) into numpy arrays, without torch."""
    storages: dict[str, _Storage] = {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise ValueError(f"{path}: a zip file without data.pkl is not a torch checkpoint")
            prefix = pkl[: -len("data.pkl")]
            with zf.open(pkl) as f:
                obj = _TorchUnpickler(f, storages).load()
            for key, st in storages.items():
                st.data = np.frombuffer(zf.read(f"{prefix}data/{key}"), st.dtype, count=st.numel)
    else:
        with open(path, "rb") as f:
            magic = pickle.load(f)
            if magic != 0x1950A86A20F9469CFC6C:
                raise ValueError(f"{path} is not a torch checkpoint (bad magic number)")
            pickle.load(f)  # protocol version
            pickle.load(f)  # system info
            obj = _TorchUnpickler(f, storages).load()
            keys = pickle.load(f)
            for key in keys:
                st = storages[str(key)]
                numel = int(np.frombuffer(f.read(8), "<i8")[0])
                st.data = np.frombuffer(f.read(numel * st.dtype.itemsize), st.dtype, count=numel)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return _resolve(obj)


def read_weight_file(path: str) -> dict[str, np.ndarray]:
    """``{torch_key: array}`` from a ``.pth``/``.pt``, ``.npz`` or ``.safetensors`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file not found: {path}")
    if path.endswith(".npz"):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    return load_torch_state_dict(path)


_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def torch_key_to_path(key: str) -> tuple[str, ...] | None:
    """NNX attribute path for a pytorch-fid key, or None for keys the port does not use."""
    parts = key.split(".")
    if parts[0] in ("fc", "AuxLogits") or parts[-1] == "num_batches_tracked":
        return None
    if parts[-2] == "conv" and parts[-1] == "weight":
        return (*parts[:-1], "kernel")
    if parts[-2] == "bn" and parts[-1] in _BN_NAMES:
        return (*parts[:-1], _BN_NAMES[parts[-1]])
    raise ValueError(f"unexpected key {key!r} in the Inception weights")


@functools.lru_cache(maxsize=1)
def _parameter_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
    return {p: tuple(v.shape) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def load_inception(path: str) -> InceptionV3:
    """An ``InceptionV3`` with the FID weights from ``path`` (see the module docstring for formats).

    Strict: every parameter of the port must be in the file with the right shape.
    """
    weights = read_weight_file(path)
    shapes = _parameter_shapes()
    values = {}
    for key, arr in weights.items():
        p = torch_key_to_path(key)
        if p is None:
            continue
        if p not in shapes:
            raise ValueError(f"unexpected key {key!r} in {path}")
        if p[-1] == "kernel":
            arr = np.transpose(arr, (2, 3, 1, 0))  # OIHW -> HWIO
        if tuple(arr.shape) != shapes[p]:
            raise ValueError(f"{key}: shape {arr.shape} in {path}, the port expects {shapes[p]}")
        values[p] = arr
    missing = sorted(".".join(p) for p in shapes if p not in values)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} Inception parameters, e.g. {missing[:3]}")
    model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
    for p, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            var.value = jnp.asarray(values[p], jnp.float32)
    return model


def inception_feature_fn(model: InceptionV3, batch_size: int = 50):
    """A function ``images (N, C, H, W) in [-1, 1] -> (N, 2048) numpy`` running in jitted batches."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def features(state, x):
        return nnx.merge(graphdef, state)(x)

    def run(images):
        images = np.asarray(images)
        out = [np.asarray(features(state, images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(out)

    return run

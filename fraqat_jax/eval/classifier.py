"""The small digits classifier shipped for the built-in default (no Inception weights needed).

A three-layer MLP on the 8x8 digits, ``64 -> 128 -> 64 -> 10`` with GELU. Its 64 penultimate
activations are the features of the Frechet distance that stands in for FID on the digits, and its
predictions give the accuracy of a student's class-conditional samples (does a sample of class k
look like a k?). Trained by :mod:`fraqat_jax.eval.train_classifier` and shipped as
``fraqat_jax/assets/digits_classifier.npz`` (weights plus its held-out test accuracy).

Images: ``(B, 1, 8, 8)`` float in ``[-1, 1]`` (the layout and range of the digits data source).
"""

from __future__ import annotations

import importlib.resources
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ASSET = "digits_classifier.npz"
FEATURE_DIM = 64
LAYERS = ((64, 128), (128, FEATURE_DIM), (FEATURE_DIM, 10))


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    """He-normal weights, zero biases: ``w{i}`` ``(in, out)``, ``b{i}`` ``(out,)`` for i = 0, 1, 2."""
    params = {}
    for i, (din, dout) in enumerate(LAYERS):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (din, dout)) * np.sqrt(2.0 / din)
        params[f"b{i}"] = jnp.zeros((dout,))
    return params


def features(params: Mapping[str, jax.Array], images: jax.Array) -> jax.Array:
    """``(B, 64)`` penultimate activations of ``images`` ``(B, 1, 8, 8)``."""
    if images.ndim != 4 or images.shape[1:] != (1, 8, 8):
        raise ValueError(f"the digits classifier takes images of shape (B, 1, 8, 8), got {images.shape}")
    h = images.reshape(images.shape[0], 64).astype(jnp.float32)
    h = jax.nn.gelu(h @ params["w0"] + params["b0"])
    return jax.nn.gelu(h @ params["w1"] + params["b1"])


def logits(params: Mapping[str, jax.Array], images: jax.Array) -> jax.Array:
    """``(B, 10)`` class logits."""
    return features(params, images) @ params["w2"] + params["b2"]


class DigitsClassifier:
    """The shipped classifier: ``features(images)``, ``predict(images)``, ``accuracy(images, labels)``.

    ``test_accuracy`` is its accuracy on the held-out real digits (recorded when it was trained).
    """

    def __init__(self, params: Mapping[str, np.ndarray], test_accuracy: float = float("nan")):
        self.params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
        self.test_accuracy = float(test_accuracy)
        self._features = jax.jit(features)
        self._logits = jax.jit(logits)

    @classmethod
    def load(cls, path: str | None = None) -> "DigitsClassifier":
        """From ``path``, or the copy shipped in ``fraqat_jax/assets``."""
        if path is None:
            ref = importlib.resources.files("fraqat_jax").joinpath("assets", ASSET)
            with ref.open("rb") as f:
                data = dict(np.load(f))
        else:
            data = dict(np.load(path))
        acc = float(data.pop("test_accuracy", np.nan))
        return cls(data, acc)

    def save(self, path: str) -> None:
        np.savez(path, test_accuracy=np.float32(self.test_accuracy), **{k: np.asarray(v) for k, v in self.params.items()})

    def features(self, images) -> np.ndarray:
        return np.asarray(self._features(self.params, jnp.asarray(images)))

    def predict(self, images) -> np.ndarray:
        return np.asarray(jnp.argmax(self._logits(self.params, jnp.asarray(images)), axis=-1))

    def accuracy(self, images, labels) -> float:
        return float(np.mean(self.predict(images) == np.asarray(labels)))

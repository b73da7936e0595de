"""Trains the shipped digits classifier: ``python -m fraqat_jax.eval.train_classifier [--out PATH]``.

Deterministic (seed 0): the shipped digits are split 80/20 by a fixed permutation, the MLP of
:mod:`fraqat_jax.eval.classifier` is trained with AdamW on the 80% with light Gaussian pixel noise
(so that it also reads the slightly noisy samples of a diffusion model), and its accuracy on the
20% is stored with the weights. Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fraqat_jax.eval import classifier

TEST_FRACTION = 0.2


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All shipped digits as ``(N, 1, 8, 8)`` float32 in ``[-1, 1]`` and int32 labels."""
    with importlib.resources.files("fraqat_jax").joinpath("assets", "digits.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["images"], data["labels"]
    return (images.astype(np.float32) / 8.0 - 1.0)[:, None], labels.astype(np.int32)


def split(seed: int = 0):
    """``(train_images, train_labels, test_images, test_labels)`` by a fixed permutation."""
    x, y = load_digits()
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * TEST_FRACTION)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def train(*, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3, noise: float = 0.15, seed: int = 0):
    """Returns ``(DigitsClassifier, test_accuracy)``."""
    xtr, ytr, xte, yte = split(seed)
    key = jax.random.key(seed)
    params = classifier.init_params(key)
    opt = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (batch_size,), 0, len(xtr))
        x = jnp.asarray(xtr)[idx]
        x = x + noise * jax.random.normal(k2, x.shape)

        def loss_fn(p):
            lg = classifier.logits(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(lg, jnp.asarray(ytr)[idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for i in range(steps):
        params, state, _ = step(params, state, jax.random.fold_in(key, i))
    model = classifier.DigitsClassifier(jax.device_get(params))
    acc = model.accuracy(xte, yte)
    model.test_accuracy = acc
    return model, acc


def main(argv=None):
    default = os.path.join(os.path.dirname(classifier.__file__), os.pardir, "assets", classifier.ASSET)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.normpath(default), help="where to write the .npz")
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    model, acc = train(steps=args.steps)
    model.save(args.out)
    print(f"digits classifier: test accuracy {acc:.4f} on {int(1797 * TEST_FRACTION)} held-out digits -> {args.out}")


if __name__ == "__main__":
    main()

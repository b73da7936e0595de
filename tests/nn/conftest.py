"""Fixtures for the fraqat_jax.nn tests (models and references live in nn_models.py)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from nn_models import MLP, Transformer


@pytest.fixture
def mlp():
    return MLP(rngs=nnx.Rngs(0))


@pytest.fixture
def transformer():
    return Transformer(rngs=nnx.Rngs(0))


@pytest.fixture
def x_mlp():
    return jax.random.normal(jax.random.key(1), (4, 16), jnp.float32)


@pytest.fixture
def x_tokens():
    return jax.random.normal(jax.random.key(2), (2, 6, 8), jnp.float32)

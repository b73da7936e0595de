"""Mesh specs and logical-axis sharding rules."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from fraqat_jax.parallel import MeshError, param_spec, parse_mesh


@pytest.mark.parametrize("spec, n, expected", [
    ("", 8, {"data": 8, "fsdp": 1, "tensor": 1}),
    ("data=2,fsdp=2,tensor=2", 8, {"data": 2, "fsdp": 2, "tensor": 2}),
    ("fsdp=-1,tensor=2", 8, {"data": 1, "fsdp": 4, "tensor": 2}),
    (" tensor = 4 , data = 1 ", 4, {"data": 1, "fsdp": 1, "tensor": 4}),
])
def test_parse_mesh(spec, n, expected):
    assert parse_mesh(spec, n) == expected


@pytest.mark.parametrize("spec, msg", [
    ("data=3", "has 3 devices but there are 8"),
    ("pipe=8", "unknown mesh axis 'pipe'"),
    ("data=two", "is not an integer"),
    ("data=8,data=1", "given twice"),
    ("data", "is not AXIS=SIZE"),
    ("data=0,fsdp=-1", "use a positive integer"),
    ("data=3,fsdp=-1", "not divisible by 3"),
])
def test_bad_mesh_specs(spec, msg):
    with pytest.raises(MeshError, match=msg):
        parse_mesh(spec, 8)


def test_param_spec_follows_logical_rules():
    devices = np.asarray(jax.devices() * 8, dtype=object)[:8].reshape(2, 2, 2)  # shapes only matter here
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    assert param_spec((64, 256), ("embed", "mlp"), mesh) == P("fsdp", "tensor")
    assert param_spec((64, 3), ("embed", None), mesh) == P("fsdp", None)
    assert param_spec((63, 256), ("embed", "mlp"), mesh) == P(None, "tensor")  # 63 not divisible by 2
    assert param_spec((11, 64), ("vocab", "embed"), mesh) == P(None, "fsdp")
    assert param_spec((64,), ("norm",), mesh) == P(None)
    # no names: FSDP along the largest divisible dimension
    assert param_spec((3, 64, 128), None, mesh) == P(None, None, "fsdp")
    assert param_spec((3, 5), None, mesh) == P()

"""parallel/: the device mesh and the sharding of parameters and batches, shared by train, eval and plan.

``mesh.py`` parses ``--mesh data=N,fsdp=M,tensor=K`` (:func:`parse_mesh`, :func:`build_mesh`), maps
the logical axis names that parameters carry to mesh axes (:data:`LOGICAL_RULES`,
:func:`param_spec`), and gives the shardings of a model state (:func:`state_shardings` as a pure
dict, :func:`shard_params` as an ``nnx.State``), of a batch (:func:`batch_sharding`) and the
placement of host values on the mesh (:func:`place`). Its axis names (:data:`BATCH_AXES`,
:data:`HEAD_AXES`) and :func:`dividing_axes` are what ``models/``' attention kernels split over.
It imports JAX and Flax, nothing of the package.
"""

from fraqat_jax.parallel.mesh import (AXES, BATCH_AXES, HEAD_AXES, LOGICAL_RULES, MeshError, batch_sharding, build_mesh,
                                      dividing_axes, names_of, param_spec, parse_mesh, place, replicated, shard_params,
                                      state_shardings, variable_sharding)

__all__ = ["AXES", "BATCH_AXES", "HEAD_AXES", "LOGICAL_RULES", "MeshError", "batch_sharding", "build_mesh",
           "dividing_axes", "names_of", "param_spec", "parse_mesh", "place", "replicated", "shard_params",
           "state_shardings", "variable_sharding"]

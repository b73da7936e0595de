"""The config vocabulary and honest state: ``act_ranges`` (the old ``act_quant`` exits 2 naming it,
old saved configs still read), ``layer_schedules`` wired through ``apply_schedules``, checkpointed
bit-widths equal to the schedule's at the saved step, and ``quant_rules=none`` checkpoints."""

import os

import numpy as np
import pytest
from flax import nnx

from fraqat_jax import runs, schedules
from fraqat_jax.nn import bits_of
from fraqat_jax.train import load_run, run
from fraqat_jax.train.__main__ import main
from fraqat_jax.train.config import ConfigError, load_config, upgrade_saved


@pytest.mark.parametrize("argv", [["--set", "act_quant=static"], ["--set", "act_granularity=static"]])
def test_old_and_bad_words_exit_2_naming_the_key(argv, capsys):
    assert main(["--steps", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "act_ranges" in err, err


def test_saved_configs_with_the_old_key_still_read():
    with pytest.raises(ConfigError, match="act_ranges"):
        load_config(base={"act_quant": "static"})
    assert load_config(base=upgrade_saved({"act_quant": "static"})).act_ranges == "static"


def test_layer_schedules_and_checkpointed_bits(base, tmp_path):
    """4 steps of fraqat (8, 7, 6, 4 bits: fewer steps than stages keep the first and the target),
    the first block's feed-forward on its own ``constant`` schedule (the target, 4 bits)."""
    workdir = str(tmp_path / "w")
    cfg = {**base, "steps": 4, "checkpoint_every": 2, "layer_schedules": r"transformer_blocks\.0\.ff\..*=constant"}
    run(cfg, workdir=workdir)
    want = schedules.by_name("fraqat", 4).values(4)
    np.testing.assert_array_equal(want, [8, 7, 6, 4])
    _, student, _ = load_run(workdir, step=2)
    own = {p: b for p, b in bits_of(student).items() if ".ff." in p}
    rest = {p: b for p, b in bits_of(student).items() if ".ff." not in p and b is not None}
    assert own and set(own.values()) == {4.0} and set(rest.values()) == {float(want[1])}
    # the checkpoint itself holds what the step trained with, not the initial 8 bits
    reader = runs.StudentReader(student, load_config(base={**cfg}))
    for step in (2, 4):
        _, saved, _ = reader.restore(workdir, step, keep=10)
        flat = {".".join(map(str, k)): float(np.asarray(v)) for k, v in _flat(saved) if k[-1] == "weight_bits"}
        assert {v for k, v in flat.items() if ".ff." in k} == {4.0}
        assert {v for k, v in flat.items() if ".ff." not in k} == {float(want[step - 1])}


def test_a_checkpoint_with_the_old_bits_name_still_loads(base, tmp_path):
    """Checkpoints written before the layers' weight bit-width was called ``weight_bits`` hold it as
    ``bits``: ``load_run`` reads them and gives the same student."""
    import shutil

    from fraqat_jax.runs.checkpoint import Checkpointer, renamed_keys

    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    run({**base, "steps": 2, "checkpoint_every": 2}, workdir=new)
    _, student, cfg = load_run(new)
    state, rest, meta = runs.StudentReader(student, cfg).restore(new)
    os.makedirs(old)
    shutil.copy(os.path.join(new, "config.json"), old)
    writer = Checkpointer(old, 1)
    writer.save(2, state, renamed_keys(rest, {"weight_bits": "bits"}), meta)
    writer.close()
    _, again, _ = load_run(old)
    assert bits_of(again) == bits_of(student)
    for (_, a), (_, b) in zip(_flat(nnx.to_pure_dict(nnx.state(student))), _flat(nnx.to_pure_dict(nnx.state(again)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unquantized_student_checkpoints_and_resumes(base, tmp_path):
    workdir = str(tmp_path / "none")
    first = run({**base, "steps": 2, "checkpoint_every": 1, "quant_rules": "none"}, workdir=workdir)
    assert first.status == "completed" and runs.checkpoint_steps(workdir) == [1, 2]
    again = run({**base, "steps": 3, "checkpoint_every": 1, "quant_rules": "none"}, workdir=workdir)
    assert again.steps == 3 and runs.checkpoint_steps(workdir)[-1] == 3
    _, student, _ = load_run(workdir)
    assert all(b is None for b in bits_of(student).values())


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, prefix + (k,))
    else:
        yield prefix, tree

"""--format transformers: a W4A8 Gemma-2 student written as a transformers folder, loaded by
transformers.AutoModelForCausalLM and compared with the student (float activations) in JAX."""

import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fraqat_jax  # noqa: E402
from fraqat_jax.export.transformers import TOLERANCE, export_transformers, float_activation_copy  # noqa: E402
from fraqat_jax.models import from_transformers  # noqa: E402
from text_fixtures import write_tiny_gemma2  # noqa: E402


def _student(folder):
    model = from_transformers(folder)
    return fraqat_jax.quantize_model(model, [fraqat_jax.Rule(r".*", weight_bits=4, act_bits=8, channel_axis=-1,
                                                             layer_types=("Linear",))])


def test_transformers_folder_loads_and_matches_the_student(tmp_path):
    folder = write_tiny_gemma2(str(tmp_path / "teacher"), seed=3)
    student = _student(folder)
    ids = np.array([[2, 17, 40, 99, 5, 230, 71, 8, 64, 12, 150, 33], [2, 45, 46, 47, 48, 9, 10, 0, 0, 0, 0, 0]],
                   np.int32)
    mask = (np.arange(12)[None] < np.array([[12], [7]])).astype(np.int32)
    batches = [{"input_ids": ids, "attention_mask": mask}]
    report = export_transformers(student, str(tmp_path / "out"), tokenizer_from=folder, check_batches=batches)
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert report["dtype"] == "bfloat16" and report["max_rel_diff_vs_float_activations"] <= TOLERANCE
    assert report["max_rel_diff_vs_w4a8"] > 0

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma2ForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("The cat")["input_ids"][0] == 2
    # every exported projection holds at most 16 values per output row (4-bit codes x one scale)
    q = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert max(len(np.unique(row)) for row in q) <= 16
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    want = np.asarray(float_activation_copy(student)(ids, attention_mask=mask), np.float64)
    w4a8 = np.asarray(student(ids, attention_mask=mask), np.float64)
    real = mask.astype(bool)
    gap = np.abs(got[real] - want[real]).max() / np.abs(want[real]).max()
    assert gap <= TOLERANCE, gap
    print(f"transformers vs student A16: {gap:.2e}; vs W4A8: "
          f"{np.abs(got[real] - w4a8[real]).max() / np.abs(w4a8[real]).max():.2e} x max|logits|")
    # the float-activation copy is a different model from the trained one only in its activations
    assert not np.allclose(want[real], w4a8[real])


@pytest.mark.slow
def test_export_cli_on_a_text_run_transformers_and_orbax(tmp_path, capsys):
    """python -m fraqat_jax.export on a language-model run: --format transformers (the folder loads in
    transformers and its logits match the run's student with float activations) and the exact orbax
    export (its frozen model gives the fake-quant student's logits)."""
    from fraqat_jax import runs
    from fraqat_jax.export import load
    from fraqat_jax.export.__main__ import main
    from text_fixtures import train_tiny_text_run

    workdir, _ = train_tiny_text_run(tmp_path)
    report = main(["--workdir", workdir, "--out", str(tmp_path / "hf"), "--format", "transformers"])
    assert "vs the W4A8 student" in capsys.readouterr().out
    assert report["max_rel_diff_vs_float_activations"] <= TOLERANCE
    _, student, _ = runs.load_run(workdir, unscan=True, attention="xla")
    ids = np.array([[2, 300, 17, 1200, 45, 9, 77, 5]], np.int32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    want = np.asarray(float_activation_copy(student)(ids), np.float64)
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()

    meta = main(["--workdir", workdir, "--out", str(tmp_path / "orbax")])
    assert meta["max_rel_diff_vs_fake_quant"] <= 1e-4
    frozen = load(str(tmp_path / "orbax"))
    np.testing.assert_allclose(np.asarray(frozen(ids)), np.asarray(student(ids)), atol=1e-4 * np.abs(want).max())

    # the export generates on its own (bundled tokenizer and generation config) what the run's
    # fake-quant student generates
    from fraqat_jax.generate.__main__ import main as generate

    assert {"tokenizer.json", "generation_config.json"} <= set(os.listdir(tmp_path / "orbax" / "tokenizer"))
    capsys.readouterr()
    for source, out in ((str(tmp_path / "orbax"), "export.jsonl"), (workdir, "student.jsonl")):
        assert generate(["--workdir", source, "--prompt", "The cat sat", "--max-new-tokens", "6",
                         "--model", "student", "--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "export.jsonl").read_text() == (tmp_path / "student.jsonl").read_text()

    with pytest.raises(SystemExit) as e:  # an existing folder that is not an export
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x.txt").write_text("x")
        main(["--workdir", workdir, "--out", str(tmp_path / "other"), "--format", "transformers"])
    assert e.value.code == 2

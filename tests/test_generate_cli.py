"""python -m fraqat_jax.generate on a trained text run (the shipped tiny Gemma-2, two steps): the
teacher's continuations against transformers' greedy ``generate`` and tokenizer, the students and
the JSON-lines output, bad input as one line and exit 2; and on a diffusion run (a tiny DiT on the
digits, one step): one PNG per class label, pixel (x + 1) / 2 * 255 of the family's sampler."""

import json
import os
import shutil

import numpy as np
import pytest

from fraqat_jax.generate.__main__ import main
from fraqat_jax.text import builtin_teacher_dir
from text_fixtures import train_tiny_text_run


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    workdir, _ = train_tiny_text_run(tmp_path_factory.mktemp("generate_text"))
    return workdir


def _fails(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and match in err, err


def test_the_teacher_continues_prompts_as_transformers_generate(text_run, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    prompts = ["The cat sat on the", "def main():"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["--workdir", text_run, "--prompts", str(tmp_path / "p.txt"), "--model", "teacher",
                 "--max-new-tokens", "12", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "text", "tokens"}] * 2 and [r["prompt"] for r in rows] == prompts

    folder = builtin_teacher_dir()
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").float().eval()
    eos = json.load(open(os.path.join(folder, "config.json")))["eos_token_id"]
    for prompt, row in zip(prompts, rows):
        ids = tok.encode(prompt).ids
        with torch.no_grad():
            seq = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                               pad_token_id=0)[0, len(ids):].tolist()
        seq = seq[:seq.index(eos)] if eos in seq else seq
        assert row["text"] == tok.decode(seq, skip_special_tokens=True) and row["tokens"] == len(seq)
        assert row["text"] in printed


def test_the_students_generate_and_stop_strings_cut_the_text(text_run, tmp_path, capsys):
    for model in ("student", "frozen"):
        out = tmp_path / f"{model}.jsonl"
        assert main(["--workdir", text_run, "--prompt", "The cat", "--model", model, "--max-new-tokens", "6",
                     "--out", str(out)]) == 0
        (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert row["prompt"] == "The cat" and 0 <= row["tokens"] <= 6
    full = json.loads(out.read_text().splitlines()[0])["text"]
    capsys.readouterr()
    if len(full.strip()) >= 2:
        stop = full.strip()[1]
        assert main(["--workdir", text_run, "--prompt", "The cat", "--model", "frozen", "--max-new-tokens", "6",
                     "--stop", stop, "--out", str(out)]) == 0
        cut = json.loads(out.read_text().splitlines()[0])["text"]
        assert cut == full[:full.index(stop)]


def test_bad_input_is_one_line_and_exit_2(text_run, tmp_path, capsys):
    _fails(capsys, ["--workdir", str(tmp_path / "nothing"), "--prompt", "x"], "does not exist")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    _fails(capsys, ["--workdir", text_run, "--prompts", str(tmp_path / "empty.txt")], "holds no prompt")
    _fails(capsys, ["--workdir", text_run, "--prompt", "x", "--top-p", "2"], "--top-p 2")
    _fails(capsys, ["--workdir", text_run, "--prompt", "the cat " * 200, "--model", "teacher"],
           "longer than the cache")
    _fails(capsys, ["--workdir", text_run, "--prompt", "x", "--chat", "--model", "teacher"], "no chat template")
    # a run whose teacher folder has no tokenizer.json
    teacher = tmp_path / "teacher"
    shutil.copytree(builtin_teacher_dir(), teacher, ignore=shutil.ignore_patterns("tokenizer*"))
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["teacher"] = str(teacher)
    (run / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["--workdir", str(run), "--prompt", "x", "--model", "teacher"], "has no tokenizer")


def test_a_diffusion_run_writes_one_png_per_label(tmp_path, capsys):
    import jax
    import matplotlib.image as mpimg
    from flax import nnx

    from eval_shared import write_tiny_teacher
    from fraqat_jax.diffusion.samplers import make_noise, model_sampler
    from fraqat_jax.runs import load_run
    from fraqat_jax.train import run

    teacher = write_tiny_teacher(tmp_path / "teacher")
    workdir = str(tmp_path / "run")
    base = {"teacher": teacher, "data": "digits", "steps": 1, "batch_size": 4, "log_every": 1, "checkpoint_every": 1,
            "num_samples": 2, "progress": "none", "warmup_steps": 1}
    assert run(base, workdir=workdir).status == "completed"
    out = tmp_path / "pngs"
    assert main(["--workdir", workdir, "--label", "3", "7", "--steps", "2", "--guidance", "1.5", "--seed", "4",
                 "--model", "teacher", "--out", str(out)]) == 0
    files = sorted(os.listdir(out))
    assert files == ["000_label3.png", "001_label7.png"]
    model, _, cfg = load_run(workdir)
    graphdef, state = nnx.split(model)
    sample = model_sampler(lambda st: nnx.merge(graphdef, st), "dit", num_steps=2, guidance_scale=1.5)
    noise, key = make_noise(4, (2, 1, 8, 8))
    x = np.asarray(sample(state, noise, {"class_labels": jax.numpy.asarray([3, 7])}, key,
                          {"class_labels": jax.numpy.int32(10)}), np.float64)
    want = np.clip((x + 1) / 2 * 255, 0, 255).round()
    for name, image in zip(files, want):
        png = mpimg.imread(str(out / name))[..., :3] * 255  # no border: 8 x 8 pixels
        assert png.shape == (8, 8, 3)
        np.testing.assert_allclose(png[..., 0], image[0], atol=0.5)
    _fails(capsys, ["--workdir", workdir, "--label", "12"], "--label [12]")

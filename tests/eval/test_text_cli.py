"""python -m fraqat_jax.eval on a language-model run (the shipped tiny Gemma-2, a few steps), checked
against transformers, and python -m fraqat_jax.compare on text at a tiny budget."""

import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fraqat_jax.eval.__main__ import main as eval_main  # noqa: E402
from fraqat_jax.text import builtin_teacher_dir  # noqa: E402
from text_fixtures import train_tiny_text_run  # noqa: E402

TEACHER = builtin_teacher_dir()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_cli")
    workdir, base = train_tiny_text_run(root)
    rows = [{"context": "def main():\n    return ", "choices": ["None", "the cat sat", "0"], "gold": 0},
            {"context": "import os\nimport ", "choices": ["sys", "the cat"], "gold": 0},
            {"context": "for i in range(10):\n    ", "choices": ["print(i)", "42 42 42"], "gold": 0}]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "lines.txt").write_text("import os\nimport sys\n\ndef f(x):\n    return x + 1\n")
    return {"root": root, "workdir": workdir, "base": base}


def test_eval_text_run_writes_tasks_perplexity_kl(small):
    out = str(small["root"] / "eval.json")
    eval_main(["--workdir", small["workdir"], "--tasks", f"mc:{small['root'] / 'mc.jsonl'}",
               "--text", str(small["root"] / "lines.txt"), "--out", out])
    result = json.loads(open(out).read())
    assert set(result) == {"tasks", "perplexity", "kl"}
    models = {"teacher", "student", "student_frozen"}
    assert set(result["tasks"]) == {"mc"} and set(result["tasks"]["mc"]) == models == set(result["perplexity"])
    assert all(set(v) == {"acc", "acc_norm", "n"} and v["n"] == 3 for v in result["tasks"]["mc"].values())
    # the teacher's numbers from transformers, with lm-eval's rule (BOS from the tokenizer, whole/context split)
    ref = transformers.AutoModelForCausalLM.from_pretrained(TEACHER, attn_implementation="eager").float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(TEACHER)

    def logprobs(ids):
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0, :-1].double()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()

    hits = hits_norm = 0
    for row in map(json.loads, (small["root"] / "mc.jsonl").read_text().splitlines()):
        ctx = tok(row["context"].rstrip())["input_ids"]
        scores = []
        for choice in row["choices"]:
            spaces = row["context"][len(row["context"].rstrip()):]
            whole = tok(row["context"].rstrip() + spaces + choice)["input_ids"]
            scores.append(logprobs(whole)[len(ctx) - 1:].sum())
        hits += int(np.argmax(scores) == row["gold"])
        hits_norm += int(np.argmax(np.array(scores) / [len(c) for c in row["choices"]]) == row["gold"])
    assert result["tasks"]["mc"]["teacher"]["acc"] == pytest.approx(hits / 3)
    assert result["tasks"]["mc"]["teacher"]["acc_norm"] == pytest.approx(hits_norm / 3)
    nll = count = 0
    lo, hi = np.inf, -np.inf
    for line in (small["root"] / "lines.txt").read_text().splitlines():
        if line.strip():
            ids = tok(line)["input_ids"]
            lp = logprobs(ids)
            nll, count = nll - lp.sum(), count + len(lp)
            with torch.no_grad():
                logits = ref(torch.tensor([ids])).logits[0].double().numpy()
            lo, hi = min(lo, logits.min()), max(hi, logits.max())
    assert result["perplexity"]["teacher"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    # The frozen integer student computes the fake-quant student's arithmetic, but an 8-bit activation
    # that sits on a rounding boundary may round the other way on another CPU; such a flip moves a
    # token's log-probabilities by at most about one 8-bit step of the logit range, so the mean NLL
    # (log perplexity) moves by at most that step. A wrong scale or code moves it by far more.
    step = (hi - lo) / 255
    log_gap = abs(math.log(result["perplexity"]["student_frozen"]) - math.log(result["perplexity"]["student"]))
    assert log_gap <= step, (log_gap, step)
    assert result["kl"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "hellaswag:x.jsonl"], "KIND:FILE"),
    (["--tasks", "mc:missing.jsonl"], "not a file"),
    (["--text", "missing.txt"], "--text"),
])
def test_bad_text_flags_exit_2(small, argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        eval_main(["--workdir", small["workdir"], *argv])
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.slow
def test_compare_on_text_writes_kl_and_perplexity_ratios(small):
    from fraqat_jax.compare import run_compare
    from fraqat_jax.train.config import load_config

    workdir = small["root"] / "cmp"
    results = run_compare(load_config(base=small["base"]), workdir=str(workdir), seeds=2,
                          methods=("ptq", "qat", "fraqat"), eval_points=1, num_val=4, log=lambda *_: None)
    saved = {r["method"]: r for r in json.loads((workdir / "compare.json").read_text())}
    assert [r["method"] for r in results] == ["ptq", "qat", "fraqat"]
    for name, r in saved.items():
        assert r["seeds"] == [1234, 1235] and not any("fd" in k for k in r)
        assert {"val_loss_ratio", "val_loss_ratio_ci", "ppl_ratio", "ppl_ratio_ci"} <= set(r)
        ratios = np.asarray(r["per_seed"]["ppl"]) / np.asarray(saved["qat"]["per_seed"]["ppl"])
        assert r["ppl_ratio"] == pytest.approx(ratios.mean(), rel=1e-12)
    assert saved["fraqat"]["per_seed"]["val_loss"][0] != saved["fraqat"]["per_seed"]["val_loss"][1]
    assert "perplexity / QAT" in (workdir / "compare.md").read_text()


def test_lm_eval_adapter_serves_a_runs_models(small):
    """FraqatLM(workdir=RUN, model=...) serves the run's teacher, student and frozen student: its
    loglikelihoods are our scorer's on the same models (load_text_run)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from fraqat_jax.eval import text as text_eval
    from fraqat_jax.eval.lm_eval_adapter import FraqatLM

    run = text_eval.load_text_run(small["workdir"])
    requests = [Instance("loglikelihood", {}, ("import os\nimport", " sys"), 0),
                Instance("loglikelihood", {}, ("def f(x):\n    return", " x + 1"), 1)]
    for name in ("teacher", "student", "student_frozen"):
        lm = FraqatLM(workdir=small["workdir"], model=name, batch_size=2)
        got = [score for score, _ in lm.loglikelihood(requests)]
        pairs = [text_eval.encode_pair(run.tokenizer, *r.args) for r in requests]
        want = [s for s, _ in text_eval.TokenScorer(run.models[name], batch_size=2).loglikelihoods(pairs)]
        np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="model="):
        FraqatLM(workdir=small["workdir"], model="ema")

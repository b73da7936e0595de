"""Text evaluation (fraqat_jax.eval.text) on a tiny random Gemma-2 against transformers: choice
scores, mc accuracy, perplexity and KL computed with the torch model in the test, lm-eval's rule."""

import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from fraqat_jax.eval import text as text_eval  # noqa: E402
from fraqat_jax.models import from_transformers  # noqa: E402
from text_fixtures import load_torch_model, write_tasks, write_tiny_gemma2  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gemma2")
    folder = write_tiny_gemma2(str(root / "teacher"), seed=0)
    other = write_tiny_gemma2(str(root / "other"), seed=1)
    tasks = write_tasks(str(root / "tasks"))
    from tokenizers import Tokenizer

    return {"folder": folder, "other": other, "tasks": tasks,
            "tokenizer": Tokenizer.from_file(f"{folder}/tokenizer.json"),
            "hf_tokenizer": transformers.AutoTokenizer.from_pretrained(folder), "torch": load_torch_model(folder),
            "torch_other": load_torch_model(other), "jax": from_transformers(folder),
            "jax_other": from_transformers(other)}


def _reference_split(hf_tok, context, continuation):
    """lm-eval's HFLM._encode_pair with the transformers tokenizer (BOS as the tokenizer adds it)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = hf_tok(context + continuation)["input_ids"]
    ctx = hf_tok(context)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx):]


def _torch_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


@pytest.mark.parametrize("kind", ["mc", "boolq", "commonsense_qa"])
def test_mc_scores_and_accuracy_match_transformers(tiny, kind):
    items = text_eval.read_task(f"{kind}:{tiny['tasks'][kind]}")
    scorer = text_eval.TokenScorer(tiny["jax"], batch_size=4, length_multiple=16)
    got = text_eval.mc_scores(scorer, tiny["tokenizer"], items)
    ref = []
    for item in items:
        row = []
        for cont in item.continuations:
            ctx, cont_ids = _reference_split(tiny["hf_tokenizer"], item.context, cont)
            assert ctx[0] == tiny["hf_tokenizer"].bos_token_id  # the tokenizer adds BOS, so the rule keeps it
            row.append(_torch_logprobs(tiny["torch"], ctx + cont_ids)[-len(cont_ids):].sum())
        ref.append(np.array(row))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=2e-4, rtol=1e-5)
    acc = np.mean([np.argmax(r) == it.gold for r, it in zip(ref, items)])
    acc_norm = np.mean([np.argmax(r / np.array([len(c) for c in it.choices])) == it.gold for r, it in zip(ref, items)])
    out = text_eval.mc_accuracy(scorer, tiny["tokenizer"], items)
    assert out == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": len(items)}


def test_perplexity_and_kl_match_transformers(tiny, tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("The cat sat on the mat.\n\nA dog ran in the park and the children laughed.\nWater boils.\n")
    lines = text_eval.read_lines(str(path))
    assert len(lines) == 3
    seqs = text_eval.encode_lines(tiny["tokenizer"], lines)
    nll, count, kl = 0.0, 0, 0.0
    for line in lines:
        ids = tiny["hf_tokenizer"](line)["input_ids"]
        nll -= _torch_logprobs(tiny["torch"], ids).sum()
        count += len(ids) - 1
        with torch.no_grad():
            lt = torch.log_softmax(tiny["torch"](torch.tensor([ids])).logits[0, :-1].double(), -1)
            ls = torch.log_softmax(tiny["torch_other"](torch.tensor([ids])).logits[0, :-1].double(), -1)
        kl += float((lt.exp() * (lt - ls)).sum())
    teacher = text_eval.TokenScorer(tiny["jax"], batch_size=2, length_multiple=8)
    student = text_eval.TokenScorer(tiny["jax_other"], batch_size=2, length_multiple=8)
    assert text_eval.perplexity(teacher, seqs) == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert text_eval.kl_divergence(teacher, student, seqs) == pytest.approx(kl / count, rel=1e-4)
    assert text_eval.kl_divergence(teacher, teacher, seqs) == pytest.approx(0.0, abs=1e-6)
    # the same windows as arrays (right-padded, mask 0 on padding) give the same perplexity
    ids = np.zeros((3, 40), np.int32)
    mask = np.zeros((3, 40), np.int32)
    for row, s in enumerate(seqs):
        ids[row, : len(s)], mask[row, : len(s)] = s, 1
    assert text_eval.perplexity(teacher, {"input_ids": ids, "attention_mask": mask}) == pytest.approx(
        math.exp(nll / count), rel=1e-5)


def test_encode_pair_moves_trailing_space_and_keeps_bos(tiny):
    tok = tiny["tokenizer"]
    ctx, cont = text_eval.encode_pair(tok, "The cat sat ", "on the mat")
    assert ctx == tok.encode("The cat sat").ids and ctx[0] == 2
    assert ctx + cont == tok.encode("The cat sat on the mat").ids


def test_prompts_are_lm_evals(tmp_path):
    rows = [{"question": "is water wet", "passage": "Water is a liquid.", "label": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (item,) = text_eval.read_task(f"boolq:{tmp_path / 'b.jsonl'}")
    assert item.context == "Water is a liquid.\nQuestion: is water wet?\nAnswer:"
    assert item.continuations == [" no", " yes"] and item.gold == 1
    row = {"question": " Where is milk kept? ", "choices": {"label": list("ABCDE"), "text": list("vwxyz")},
           "answerKey": "C"}
    (tmp_path / "c.jsonl").write_text(json.dumps(row))
    (item,) = text_eval.read_task(f"commonsense_qa:{tmp_path / 'c.jsonl'}")
    assert item.context == "Question: Where is milk kept?\nA. v\nB. w\nC. x\nD. y\nE. z\nAnswer:"
    assert item.continuations == [" A", " B", " C", " D", " E"] and item.gold == 2


@pytest.mark.parametrize("spec, row, needle", [
    ("mc", {"context": "a", "choices": ["x", "y"], "gold": 2}, "gold=2"),
    ("mc", {"context": "a", "choices": "xy", "gold": 0}, "'choices'"),
    ("boolq", {"question": "q", "passage": "p", "label": 3}, "'label'"),
    ("commonsense_qa", {"question": "q", "choices": {"text": ["a"]}, "answerKey": "A"}, "'choices'"),
    ("commonsense_qa", {"question": "q", "choices": {"text": list("abcde")}, "answerKey": "F"}, "'answerKey'"),
])
def test_bad_rows_name_the_row_and_field(tmp_path, spec, row, needle):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(text_eval.TaskError, match=needle):
        text_eval.read_task(f"{spec}:{path}")


def test_task_specs_and_names(tmp_path):
    with pytest.raises(text_eval.TaskError, match="KIND:FILE"):
        text_eval.read_task("hellaswag:x.jsonl")
    with pytest.raises(text_eval.TaskError, match="not a file"):
        text_eval.read_task(f"mc:{tmp_path / 'missing.jsonl'}")
    assert text_eval.task_names(["boolq:a/b.jsonl", "mc:x.jsonl"]) == ["boolq", "mc"]
    assert text_eval.task_names(["mc:a/x.jsonl", "mc:y.json"]) == ["mc:x", "mc:y"]


def test_evaluate_models_three_models(tiny):
    """teacher / student (W4A8 fake quant) / student_frozen: the eval.json text content; the frozen
    model scores as the fake-quant one (to float rounding), the student differs from the teacher."""
    import fraqat_jax

    student = fraqat_jax.quantize_model(from_transformers(tiny["folder"]), [fraqat_jax.Rule(
        r".*", weight_bits=4, act_bits=8, layer_types=("Linear",))])
    models = {"teacher": tiny["jax"], "student": student, "student_frozen": fraqat_jax.freeze(student)}
    tasks = {"mc": text_eval.read_task(f"mc:{tiny['tasks']['mc']}")}
    seqs = text_eval.encode_lines(tiny["tokenizer"], ["The cat sat on the mat.", "Water boils at one hundred."])
    out = text_eval.evaluate_models(models, tiny["tokenizer"], tasks=tasks, sequences=seqs, batch_size=4,
                                    length_multiple=16)
    assert set(out) == {"tasks", "perplexity", "kl"}
    assert set(out["tasks"]["mc"]) == set(out["perplexity"]) == {"teacher", "student", "student_frozen"}
    assert all(set(v) == {"acc", "acc_norm", "n"} for v in out["tasks"]["mc"].values())
    ppl = out["perplexity"]
    assert ppl["student_frozen"] == pytest.approx(ppl["student"], rel=1e-5)
    assert ppl["student"] != pytest.approx(ppl["teacher"], rel=1e-4)
    lp_t = text_eval.TokenScorer(models["teacher"], batch_size=2).logprobs(seqs)
    assert ppl["teacher"] == pytest.approx(math.exp(-np.mean(np.concatenate(lp_t))), rel=1e-6)
    assert out["kl"] > 0

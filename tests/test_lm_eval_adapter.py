"""The lm-eval adapter (model "fraqat") offline through lm_eval.simple_evaluate on local JSON tasks, and
our mc scorer against the harness's own transformers model (HFLM) on the same items."""

import os
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), f"fraqat_jax_hf_datasets_{os.getuid()}"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

from fraqat_jax.eval import text as text_eval  # noqa: E402
from fraqat_jax.eval.lm_eval_adapter import FraqatLM  # noqa: E402
from text_fixtures import load_torch_model, write_tasks, write_tiny_gemma2  # noqa: E402

LM_EVAL_TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers
    from lm_eval.models.huggingface import HFLM

    from fraqat_jax.data.text import load_tokenizer
    from fraqat_jax.models import from_transformers

    root = tmp_path_factory.mktemp("lm_eval_tiny")
    folder = write_tiny_gemma2(str(root / "teacher"))
    model = from_transformers(folder)
    hf = HFLM(pretrained=load_torch_model(folder), tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
              batch_size=4)
    return {"folder": folder, "tasks": write_tasks(str(root / "tasks"), n=8), "model": model, "hf": hf,
            "tokenizer": load_tokenizer(folder),
            "scorer": text_eval.TokenScorer(model, batch_size=4, length_multiple=64)}


def _local(task: dict, name: str, path: str) -> dict:
    """A harness task config read from ``path`` (a local JSON file) instead of the Hub."""
    task = {k: v for k, v in task.items() if k not in ("tag", "dataset_name", "training_split", "metadata")}
    return {**task, "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": path}},
            "validation_split": "validation",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def _harness_task(kind: str, path: str) -> dict:
    if kind == "mc":
        return _local({"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                       "doc_to_target": "{{gold}}", "target_delimiter": ""}, "tiny_mc", path)
    file = {"boolq": "super_glue/boolq/default.yaml", "commonsense_qa": "commonsense_qa/default.yaml"}[kind]
    with open(os.path.join(LM_EVAL_TASKS, file)) as f:  # the harness's own prompt, choices and target
        return _local(yaml.safe_load(f), f"tiny_{kind}", path)


def _evaluate(model, task: dict) -> tuple[dict, list]:
    from lm_eval.tasks import TaskManager

    # the local task is given as a config: no need to index the harness's thousands of task files
    out = lm_eval.simple_evaluate(model=model, tasks=[task], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_defaults=False),
                                  random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    name = task["task"]
    return out["results"][name], out["samples"][name]


def _scores(samples) -> list[np.ndarray]:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    return [np.array([float(r[0][0]) for r in s["resps"]]) for s in samples]


@pytest.mark.parametrize("kind", ["mc", "boolq", "commonsense_qa"])
def test_mc_scorer_matches_the_harness_on_the_same_items(tiny, kind):
    """The harness with its transformers model (HFLM) is the reference for accuracy and every score."""
    ref, ref_samples = _evaluate(tiny["hf"], _harness_task(kind, tiny["tasks"][kind]))
    items = text_eval.read_task(f"{kind}:{tiny['tasks'][kind]}")
    scorer, tokenizer = tiny["scorer"], tiny["tokenizer"]
    ours = text_eval.mc_accuracy(scorer, tokenizer, items)
    assert ours["n"] == len(ref_samples) == 8
    assert ours["acc"] == pytest.approx(ref["acc,none"])
    assert ours["acc_norm"] == pytest.approx(ref["acc_norm,none"])
    for got, want in zip(text_eval.mc_scores(scorer, tokenizer, items), _scores(ref_samples)):
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)


def test_simple_evaluate_serves_our_model_offline(tiny):
    """model="fraqat" (registered on import) with model_args, a local JSON task, the tiny model:
    the harness's numbers equal our scorer's, and loglikelihood_rolling and generate_until answer."""
    task = _harness_task("boolq", tiny["tasks"]["boolq"])
    res, samples = _evaluate(lm_eval.api.registry.get_model("fraqat").create_from_arg_string(
        f"pretrained={tiny['folder']},batch_size=4"), task)
    items = text_eval.read_task(f"boolq:{tiny['tasks']['boolq']}")
    model, scorer, tokenizer = tiny["model"], tiny["scorer"], tiny["tokenizer"]
    ours = text_eval.mc_accuracy(scorer, tokenizer, items)
    assert (res["acc,none"], res["acc_norm,none"]) == pytest.approx((ours["acc"], ours["acc_norm"]))
    for got, want in zip(text_eval.mc_scores(scorer, tokenizer, items), _scores(samples)):
        np.testing.assert_allclose(got, want, atol=1e-5)

    lm = FraqatLM(lm=model, tokenizer=tokenizer, batch_size=2, max_length=16)
    from lm_eval.api.instance import Instance

    line = "The cat sat on the mat and looked at the bird. A dog ran in the park."
    assert len(tokenizer.encode(line).ids) > 2 * 16  # three rolling windows of <= 16 inputs
    request = [Instance("loglikelihood_rolling", {}, (line,), 0)]
    (rolling,) = lm.loglikelihood_rolling(request)
    import transformers
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=load_torch_model(tiny["folder"]), batch_size=2, max_length=16,
              tokenizer=transformers.AutoTokenizer.from_pretrained(tiny["folder"]))
    assert rolling == pytest.approx(hf.loglikelihood_rolling(request)[0], rel=1e-5)
    (gen,) = lm.generate_until([Instance("generate_until", {}, ("The cat", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    ids = tokenizer.encode("The cat").ids
    for _ in range(5):  # greedy continuation by full forward passes
        logits = model(np.array([ids], np.int32))
        ids.append(int(np.argmax(logits[0, -1])))
    want_text = tokenizer.decode(ids[len(tokenizer.encode("The cat").ids):], skip_special_tokens=False)
    assert gen == want_text.split("\n")[0]

"""lm-eval's own command line (``python -m fraqat_jax.eval.harness``) on our model, offline, on local
task YAMLs (``dataset_path: json``): a ``generate_until`` task answered by the one decoder (the logged
responses equal ``models.sampler``'s continuations, cut at the task's stop strings) and a
multiple-choice task scored as our scorer scores it."""

import json
import os
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), f"fraqat_jax_hf_datasets_{os.getuid()}"))

import pytest  # noqa: E402

pytest.importorskip("lm_eval")

from fraqat_jax.eval import text as text_eval  # noqa: E402
from fraqat_jax.eval.harness import main  # noqa: E402
from text_fixtures import write_tiny_gemma2  # noqa: E402

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", " park"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _samples(out_dir, task):
    paths = [os.path.join(r, f) for r, _, fs in os.walk(out_dir) for f in fs if f.startswith(f"samples_{task}")]
    assert len(paths) == 1, paths
    with open(paths[0]) as f:
        return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])


def test_lm_eval_command_line_runs_a_generation_and_a_choice_task_on_our_model(tmp_path):
    from fraqat_jax.data.text import load_tokenizer
    from fraqat_jax.models import from_transformers
    from fraqat_jax.models.sampler import Sampler, end_token_ids

    folder = write_tiny_gemma2(str(tmp_path / "teacher"))
    gen_rows = [{"question": q, "answer": "x"} for q in ("The cat sat on", "A dog ran in the", "Water boils at")]
    mc_rows = [{"context": "The cat sat on the", "choices": [" mat", " sea", " car"], "gold": 0},
               {"context": "Water boils at one", "choices": [" hundred", " dog"], "gold": 0}]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, rows, yaml in (("gen", gen_rows, GEN_YAML), ("mc", mc_rows, MC_YAML)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tasks / f"{name}.yaml").write_text(yaml.format(data=data))
    out = tmp_path / "out"
    code = main(["--model", "fraqat", "--model_args", f"pretrained={folder},batch_size=4",
                 "--tasks", "tiny_gen,tiny_choice", "--include_path", str(tasks), "--output_path", str(out),
                 "--log_samples", "--seed", "0"])
    assert code == 0

    model, tokenizer = from_transformers(folder), load_tokenizer(folder)
    sampler = Sampler(model, tokenizer, eos_ids=end_token_ids(folder, dict(model.config), tokenizer))
    want = sampler.generate([r["question"] for r in gen_rows], max_new_tokens=6, stop=["\n", " park"])
    got = [s["resps"][0][0] for s in _samples(out, "tiny_gen")]
    assert got == [w.text for w in want] and any(got)

    scorer = text_eval.TokenScorer(model, batch_size=4, length_multiple=32)
    items = [text_eval.McItem(r["context"], r["choices"], r["gold"]) for r in mc_rows]
    scores = text_eval.mc_scores(scorer, tokenizer, items)
    for sample, ours in zip(_samples(out, "tiny_choice"), scores):
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(list(ours), abs=2e-4)


def test_bad_arguments_exit_2_as_lm_eval_says():
    assert main(["--model", "fraqat", "--no-such-flag"]) == 2

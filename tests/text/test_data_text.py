"""Text sources (fraqat_jax.data.text): packing into windows, position determinism, held-out windows,
TFDS text datasets, and the one-line errors."""

import json
import numpy as np
import pytest

from fraqat_jax.data import DataSourceError
from fraqat_jax.data.sources import epoch_permutation
from fraqat_jax.data.text import make_text_source, read_documents

WORDS = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(40)]
CONFIG = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "max_position_embeddings": 16}


@pytest.fixture
def teacher_dir(tmp_path):
    """A folder with a word-level tokenizer.json (w<i> -> i + 4) and the ids config.json names."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "teacher"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return str(folder)


def words(ids):
    return " ".join(f"w{i - 4}" for i in ids)


def source(spec, teacher_dir, seq_len=5, seed=0):
    return make_text_source(spec, tokenizer_dir=teacher_dir, model_config=CONFIG, seq_len=seq_len, seed=seed)


def test_a_folder_of_txt_and_jsonl_packs_into_bos_windows(tmp_path, teacher_dir):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text(words([4, 5, 6, 7, 8, 9, 10]))
    (data / "sub" / "b.jsonl").write_text(json.dumps({"text": words([11, 12])}) + "\n\n"
                                          + json.dumps({"text": words(range(13, 40)), "id": 3}) + "\n")
    (data / "ignored.md").write_text("w1 w2")
    assert read_documents(str(data)) == [words([4, 5, 6, 7, 8, 9, 10]), words([11, 12]), words(range(13, 40))]
    # by hand: each document then eos, joined, cut into pieces of seq_len - 1 = 4, each after bos
    stream = [4, 5, 6, 7, 8, 9, 10, 1, 11, 12, 1, *range(13, 40), 1]
    n = len(stream) // 4
    want = np.array([[2, *stream[4 * i:4 * i + 4]] for i in range(n)], np.int32)
    src = source(f"text:{data}", teacher_dir)
    held = 1  # ceil(n / 50)
    np.testing.assert_array_equal(np.concatenate([src.windows, src.heldout_windows]), want)
    assert src.num_examples == n - held and len(src.heldout()["input_ids"]) == held
    assert src.element_spec == {"input_ids": ((5,), np.dtype(np.int32)), "attention_mask": ((5,), np.dtype(np.int32))}
    np.testing.assert_array_equal(src.heldout(3)["input_ids"], np.repeat(want[-1:], 3, axis=0))


def test_batches_are_a_function_of_the_position_and_never_hold_out_windows(tmp_path, teacher_dir):
    path = tmp_path / "one.txt"
    path.write_text(words(np.random.default_rng(0).integers(4, 44, 300)))  # windows all distinct
    src, again = source(f"text:{path}", teacher_dir, seed=7), source(f"text:{path}", teacher_dir, seed=7)
    n = src.num_examples
    assert n == 75 - 2  # 301 tokens -> 75 windows, ceil(75 / 50) = 2 held out
    rows = np.concatenate([src.batch(p, 8)["input_ids"] for p in range(10)])  # 80 = one epoch and 7
    np.testing.assert_array_equal(rows[:n], src.windows[epoch_permutation(7, 0, n)])
    np.testing.assert_array_equal(rows[n:], src.windows[epoch_permutation(7, 1, n)[:7]])
    np.testing.assert_array_equal(again.batch(4, 8)["input_ids"], src.batch(4, 8)["input_ids"])
    assert (src.batch(4, 8)["attention_mask"] == 1).all()
    held = {tuple(w) for w in src.heldout()["input_ids"]}
    assert held and not held & {tuple(w) for w in rows}
    halves = [src.batch(3, 8, host_index=h, host_count=2)["input_ids"] for h in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), src.batch(3, 8)["input_ids"])


@pytest.mark.parametrize("case, match", [
    ("no_tokenizer", "has no tokenizer.json"),
    ("empty", "is empty"),
    ("too_long", "seq_len=32 .*at most 16 positions"),
    ("missing", "does not exist"),
    ("bad_jsonl", "line 2 has no 'text' string"),
    ("suffix", "is not a text file"),
    ("too_short", "at least 2 are needed"),
])
def test_bad_input_is_one_line_naming_the_source(tmp_path, teacher_dir, case, match):
    path, seq_len, tok_dir = tmp_path / "d.txt", 5, teacher_dir
    path.write_text(words(range(4, 30)))
    if case == "no_tokenizer":
        tok_dir = str(tmp_path)
    elif case == "empty":
        path.write_text("")
    elif case == "too_long":
        seq_len = 32
    elif case == "missing":
        path = tmp_path / "nowhere.txt"
    elif case == "bad_jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text('{"text": "w1"}\n{"body": "w2"}\n')
    elif case == "suffix":
        path = tmp_path / "d.csv"
        path.write_text("w1")
    elif case == "too_short":
        path.write_text("w1 w2")
    with pytest.raises(DataSourceError, match=match) as e:
        source(f"text:{path}", tok_dir, seq_len=seq_len)
    assert "\n" not in str(e.value) and f"text:{path}" in str(e.value)


def test_tfds_text_dataset_gives_one_padded_window_per_example(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    # mock imdb reviews are letters a..j and spaces: one token per letter (ids 4..13), spaces unknown
    tok = Tokenizer(models.WordLevel({"<unk>": 3, **{c: 4 + i for i, c in enumerate("abcdefghij")}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        src = make_text_source("tfds:imdb_reviews:train", tokenizer_dir=str(tmp_path), model_config=CONFIG,
                               seq_len=16, seed=1)
        raw = tfds.data_source("imdb_reviews", split="train")
        assert src.num_examples == 19 and src.num_heldout == 1

        def want(i):
            ids = [4 + "abcdefghij".index(c) if c != " " else 3 for c in raw[int(i)]["text"]][:15]
            return np.array([2, *ids] + [0] * (15 - len(ids)), np.int32), np.arange(16) < 1 + len(ids)

        batch = src.batch(1, 4)
        for row, i in enumerate(epoch_permutation(1, 0, 19)[4:8]):
            ids, mask = want(i)
            np.testing.assert_array_equal(batch["input_ids"][row], ids)
            np.testing.assert_array_equal(batch["attention_mask"][row], mask)
        assert not batch["attention_mask"].all()  # some reviews are shorter than the window
        np.testing.assert_array_equal(src.heldout(1)["input_ids"][0], want(19)[0])

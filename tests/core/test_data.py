"""Datasets: determinism, shapes, task semantics checked by hand, and clear errors."""
import numpy as np
import pytest
import torch

import workbench as wb
from workbench.core.data import IGNORE


@pytest.mark.parametrize("name", ["digits", "khop", "modadd", "text"])
def test_same_seed_same_data_other_seed_other_data(name):
    a, b = wb.data.load(name, seed=0), wb.data.load(name, seed=0)
    c = wb.data.load(name, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not (a.x_train.shape == c.x_train.shape and torch.equal(a.x_train, c.x_train))


def test_digits_split_and_standardisation():
    from sklearn.datasets import load_digits

    ds = wb.data.load("digits")
    n = len(load_digits().target)
    assert len(ds.y_train) + len(ds.y_val) == n == 1797
    assert ds.kind == "vector" and ds.d_in == 64 and ds.n_classes == 10
    mu = ds.x_train.mean(0)
    assert torch.allclose(mu, torch.zeros(64), atol=1e-5)
    # every class appears in both splits (stratified)
    assert set(ds.y_val.tolist()) == set(range(10))


def test_mnist1d_matches_the_paper_sizes():
    ds = wb.data.load("mnist1d")
    assert ds.x_train.shape == (4000, 40) and ds.x_val.shape == (1000, 40)
    assert ds.n_classes == 10
    state = np.random.get_state()[1].copy()
    wb.data.load("mnist1d", num_samples=200)
    assert np.array_equal(np.random.get_state()[1], state), "global numpy RNG must be left untouched"


def test_mnist1d_accuracies_agree_with_the_paper_table():
    """Greydanus 2020: logistic regression 32%, MLP 68% test accuracy (an independent check of the data)."""
    from sklearn.linear_model import LogisticRegression

    ds = wb.data.load("mnist1d")
    logreg = LogisticRegression(max_iter=1000).fit(ds.x_train.numpy(), ds.y_train.numpy())
    assert 0.26 <= logreg.score(ds.x_val.numpy(), ds.y_val.numpy()) <= 0.38
    torch.manual_seed(0)
    mlp = wb.models.build(wb.models.config_for(ds, d_model=100, d_hidden=100, n_layers=2))
    run = wb.train(mlp, ds, wb.TrainConfig(steps=1000, batch_size=100, lr=1e-3, eval_every=1000, eval_max=0))
    assert 0.58 <= run.final("acc") <= 0.78


def test_khop_answer_follows_the_pointers_by_hand():
    ds = wb.data.load("khop", hops=3, nodes=6, n_train=50, n_val=10)
    vocab = ds.vocab
    for x, y in zip(ds.x_train, ds.y_train):
        toks = [vocab[i] for i in x.tolist()]
        bar = toks.index("|")
        edges = dict(zip(toks[0:bar:2], toks[1:bar:2]))
        node = toks[bar + 1]
        for _ in range(3):
            node = edges[node]
        assert vocab[int(y[-1])] == node
        assert (y[:-1] == IGNORE).all()
        assert toks[-1] == "?"


def test_khop_several_queries_follow_the_pointers_by_hand():
    ds = wb.data.load("khop", hops=2, nodes=7, queries=3, n_train=40, n_val=10)
    vocab = ds.vocab
    for x, y in zip(ds.x_train, ds.y_train):
        toks = [vocab[i] for i in x.tolist()]
        bar = toks.index("|")
        edges = dict(zip(toks[0:bar:2], toks[1:bar:2]))
        scored = [i for i in range(len(toks)) if y[i] != IGNORE]
        assert scored == [bar + 2, bar + 4, bar + 6] and all(toks[i] == "?" for i in scored)
        for i in scored:
            assert vocab[int(y[i])] == edges[edges[toks[i - 1]]]


def test_khop_table_layout_follows_the_pointers_by_hand():
    ds = wb.data.load("khop", hops=3, nodes=5, queries=4, layout="table", n_train=40, n_val=10)
    assert ds.seq_len == 5 + 1 + 4
    vocab = ds.vocab
    for x, y in zip(ds.x_val, ds.y_val):
        toks = [vocab[i] for i in x.tolist()]
        f = {vocab[i]: toks[i] for i in range(5)}           # position i holds f(node i)
        assert toks[5] == "|" and (y[:6] == IGNORE).all()
        for i in range(6, 10):
            node = toks[i]
            for _ in range(3):
                node = f[node]
            assert vocab[int(y[i])] == node


def test_modadd_is_complete_and_correct():
    ds = wb.data.load("modadd", p=7, train_fraction=0.5)
    x = torch.cat([ds.x_train, ds.x_val])
    y = torch.cat([ds.y_train, ds.y_val])[:, -1]
    assert len(x) == 49
    assert {(int(a), int(b)) for a, b in x[:, [0, 2]]} == {(a, b) for a in range(7) for b in range(7)}
    assert all(int(t) == (int(r[0]) + int(r[2])) % 7 for r, t in zip(x, y))


def test_text_targets_are_next_characters(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("hello world, " * 200, encoding="utf-8")
    ds = wb.data.load("text", path=str(f), context=16)
    assert torch.equal(ds.x_train[0, 1:], ds.y_train[0, :-1])
    assert ds.decode(ds.x_train[0]) == ("hello world, " * 3)[:16]
    assert torch.equal(ds.encode("hello"), ds.x_train[0, :5])


def test_builtin_text_is_deterministic_across_calls():
    assert wb.data.grammar_corpus(5000, seed=3) == wb.data.grammar_corpus(5000, seed=3)


@pytest.mark.parametrize("call, fragment", [
    (lambda: wb.data.load("imagenet"), "dataset must be one of"),
    (lambda: wb.data.load("digits", colour=True), "allowed: ['seed', 'val_fraction']"),
    (lambda: wb.data.load("khop", hops=0), "khop.hops must be in [1, 8]"),
    (lambda: wb.data.load("modadd", train_fraction=1.5), "modadd.train_fraction must be in [0.01, 0.99]"),
    (lambda: wb.data.load("khop", nodes=4, length=6), "khop.length must be in [1, nodes=4]"),
    (lambda: wb.data.load("khop", layout="grid"), "khop.layout must be one of ['edges', 'table']"),
    (lambda: wb.data.load("khop", layout="table", nodes=6, length=3), "khop.length must be 0 or nodes=6"),
    (lambda: wb.data.load("khop", queries=0), "khop.queries must be in [1, 52]"),
    (lambda: wb.data.load("text", path="/no/such/file.txt"), "text.path: no such file"),
    (lambda: wb.data.load("text", context="long"), "text.context must be an integer in [2, 4096], got 'long'"),
])
def test_bad_options_name_the_field_and_range(call, fragment):
    with pytest.raises(ValueError) as e:
        call()
    assert fragment in str(e.value)


def test_text_rejects_binary_files(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(ValueError, match="not UTF-8"):
        wb.data.load("text", path=str(f))


def test_text_corpus_option_builds_other_domains_and_keeps_the_default():
    default = wb.data.load("text", context=16, corpus_chars=2000)
    assert torch.equal(default.x_train, wb.data.load("text", corpus="grammar", context=16, corpus_chars=2000).x_train)
    assert default.decode(default.x_train[0]) == wb.data.grammar_corpus(2000)[:16]
    arith = wb.data.load("text", corpus="arithmetic", context=16, corpus_chars=2000, seed=1)
    lines = wb.data.arithmetic_corpus(2000, seed=1).splitlines()[:-1]  # the last line may be cut
    for line in lines:  # every complete line is a true equation
        lhs, rhs = line.split("=")
        assert eval(lhs) == int(rhs), line  # noqa: S307 (digits and one operator only)
    assert set(arith.vocab) <= set("0123456789+-*=\n")
    code = wb.data.load("text", corpus="code", context=16, corpus_chars=2000)
    assert code.decode(code.x_train[0]).startswith("def ")
    assert wb.data.code_corpus(3000, seed=2) == wb.data.code_corpus(3000, seed=2)
    assert arith.spec()["corpus"] == "arithmetic"
    with pytest.raises(ValueError, match=r"text.corpus must be one of \['arithmetic', 'code', 'grammar'\]"):
        wb.data.load("text", corpus="poetry")


# ----------------------------------------------------------------------------- kind and shape from the options

SHAPE_CASES = [
    ("digits", {}), ("digits", {"val_fraction": 0.33}), ("mnist1d", {"num_samples": 1234}),
    ("khop", {"hops": 3, "nodes": 7, "queries": 2, "n_train": 50, "n_val": 20}),
    ("khop", {"layout": "table", "nodes": 9, "queries": 3, "n_train": 40, "n_val": 10}),
    ("khop", {"nodes": 10, "length": 6, "n_train": 30, "n_val": 10}),
    ("modadd", {"p": 13, "train_fraction": 0.3}),
    ("text", {"corpus": "code", "corpus_chars": 3000, "context": 20, "seed": 4}),
    ("text", {"corpus": "arithmetic", "corpus_chars": 1000, "context": 8}),
    ("text", {"text": "the cat sees the moon. " * 30, "context": 16, "val_fraction": 0.2}),
    ("text", {"text": "abcab" * 100, "vocab": "cbaxyz", "context": 10}),
]


@pytest.mark.parametrize("name, options", SHAPE_CASES)
def test_shape_of_agrees_with_the_built_dataset(name, options):
    shape, ds = wb.data.shape_of(name, **options), wb.data.load(name, **options)   # reference: the data itself
    assert shape.kind == ds.kind == wb.data.kind_of(name)
    assert shape.d_in == ds.d_in and shape.n_classes == ds.n_classes == shape.vocab_size
    assert (shape.n_train, shape.n_val) == (len(ds.x_train), len(ds.x_val))
    assert (list(shape.vocab) if shape.vocab is not None else None) == ds.vocab
    assert wb.models.config_for(shape) == wb.models.config_for(ds)   # a model config from the options alone


@pytest.mark.parametrize("corpus", ["grammar", "arithmetic", "code"])
@pytest.mark.parametrize("n_chars, seed", [(1000, 0), (1001, 5), (4000, 2), (250_000, 1)])
def test_the_corpus_vocabulary_is_that_of_the_whole_corpus(corpus, n_chars, seed):
    shape = wb.data.shape_of("text", corpus=corpus, corpus_chars=n_chars, seed=seed, context=8)
    assert list(shape.vocab) == sorted(set(wb.data.CORPORA[corpus](n_chars, seed)))


def test_shape_of_the_largest_corpus_is_found_without_building_it(monkeypatch):
    pieces, read = wb.data._PIECES["arithmetic"], []

    def counted(seed):
        for piece in pieces(seed):
            read.append(len(piece))
            yield piece
    monkeypatch.setitem(wb.data._PIECES, "arithmetic", counted)
    shape = wb.data.shape_of("text", corpus="arithmetic", corpus_chars=10_000_000, context=64)
    assert list(shape.vocab) == sorted("0123456789+-*=\n")
    assert shape.n_train == (9_000_000 - 65) // 64 + 1
    assert 0 < sum(read) < 100_000        # read until every character appeared, not 10 million


@pytest.mark.parametrize("call, fragment", [
    (lambda: wb.data.kind_of("imagenet"), "dataset must be one of"),
    (lambda: wb.data.shape_of("khop", n_train=1_000_001), "khop.n_train must be in [10, 1000000]"),
    (lambda: wb.data.shape_of("khop", nodes=4, length=6), "khop.length must be in [1, nodes=4]"),
    (lambda: wb.data.shape_of("khop", layout="table", nodes=6, length=3), "khop.length must be 0 or nodes=6"),
    (lambda: wb.data.shape_of("khop", n_train=1_000_000, n_val=100_000, nodes=52),
     "more than the limit of 1024 MB (WORKBENCH_MAX_DATA_MB)"),
    (lambda: wb.data.shape_of("text", text="ab" * 10, context=16), "too short for context 16"),
    (lambda: wb.data.shape_of("text", text="abc" * 100, vocab="ab"), "text.vocab: 1 characters of the text"),
])
def test_shape_of_refuses_what_load_refuses(call, fragment):
    with pytest.raises(ValueError) as e:
        call()
    assert fragment in str(e.value)

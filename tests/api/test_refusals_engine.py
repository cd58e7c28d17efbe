"""Issue 10, engine side: each reproduced item (3, 6, 12, 13, 14, 15) as the test that would have caught it."""
import json
import math

import pytest
import torch

import workbench as wb
from workbench import data, models
from workbench.core.data import Dataset
from workbench.core.models import MLPConfig, TransformerConfig
from workbench.core.training import TrainConfig, check_pairing, diverged


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


@pytest.fixture(scope="module")
def khop():
    return data.load("khop", nodes=6, n_train=64, n_val=32)


def _tiny_mlp(ds, **kw):
    return models.build(models.config_for(ds, **{"d_model": 16, "d_hidden": 16, "n_layers": 1, **kw}))


# ----------------------------------------------------------------------------- item 6: memory budget

def test_the_1_1_tb_mlp_config_is_refused_with_the_estimate_and_the_limit():
    cfg = MLPConfig(d_in=4, n_classes=2, d_model=8192, d_hidden=65536, n_layers=256)
    with pytest.raises(ValueError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "WORKBENCH_MAX_MODEL_MB" in msg and "2048 MB" in msg
    # 256 blocks of two 8192 x 65536 matrices: 2.75e11 weights, 1.0 TiB in float32
    n = 256 * (2 * 8192 * 65536 + 65536 + 8192 + 2 * 8192) + (4 * 8192 + 8192) + 2 * 8192 + (8192 * 2 + 2)
    assert f"{n:,} parameters" in msg
    with pytest.raises(ValueError, match="WORKBENCH_MAX_MODEL_MB"):
        models.build(cfg)  # refused before any allocation
    with pytest.raises(ValueError, match="WORKBENCH_MAX_MODEL_MB"):
        models.ResidualMLP(cfg)
    with pytest.raises(ValueError, match="WORKBENCH_MAX_MODEL_MB"):
        models.build(models.config_to_dict(cfg))


@pytest.mark.parametrize("cfg", [
    MLPConfig(d_in=64, n_classes=10, n_layers=3, norm="peri"),
    MLPConfig(d_in=7, n_classes=3, n_layers=0, norm="none", d_model=5),
    TransformerConfig(vocab_size=11, context=9, d_model=16, n_heads=2, d_mlp=24, n_layers=2),
    TransformerConfig(vocab_size=11, context=9, d_model=16, n_heads=2, d_mlp=24, norm="peri", tie_embeddings=True),
])
def test_the_parameter_estimate_equals_the_built_models_count(cfg):
    est = models.estimate_memory(cfg)
    assert est["params"] == models.count_params(models.build(cfg))  # reference: the built model
    assert est["param_bytes"] == 4 * est["params"] and est["train_bytes"] == 16 * est["params"]
    assert est["total_bytes"] == est["train_bytes"] + est["activation_bytes"]
    assert models.estimate_memory(cfg, batch_size=32)["activation_bytes"] == 2 * est["activation_bytes"]


def test_the_budget_follows_the_environment(monkeypatch, digits):
    cfg = MLPConfig(d_in=64, n_classes=10, d_model=256, d_hidden=1024, n_layers=4)  # ~2.1 M params, ~34 MB
    cfg.validate()
    monkeypatch.setenv("WORKBENCH_MAX_MODEL_MB", "10")
    with pytest.raises(ValueError, match=r"more than the limit of 10 MB \(WORKBENCH_MAX_MODEL_MB\)"):
        cfg.validate()
    monkeypatch.setenv("WORKBENCH_MAX_MODEL_MB", "-3")
    with pytest.raises(ValueError, match="WORKBENCH_MAX_MODEL_MB must be a positive number"):
        cfg.validate()
    # train() checks the real batch: fits the nominal batch, not 4096 examples per step
    monkeypatch.delenv("WORKBENCH_MAX_MODEL_MB")
    model = _tiny_mlp(digits)
    monkeypatch.setenv("WORKBENCH_MAX_MODEL_MB", "1")
    with pytest.raises(ValueError, match="for a batch of 1437"):
        wb.train(model, digits, TrainConfig(steps=1, batch_size=4096))


def test_a_planted_run_json_with_a_huge_model_is_refused_on_load(store, digits):
    run = wb.train(_tiny_mlp(digits), digits, TrainConfig(steps=1, eval_every=1))
    run_id = store.save(run)
    path = store.runs_dir / run_id / "run.json"
    doc = json.loads(path.read_text())
    doc["model"].update(d_model=8192, d_hidden=65536, n_layers=256)
    path.write_text(json.dumps(doc))
    with pytest.raises(Exception, match="WORKBENCH_MAX_MODEL_MB"):
        store.load(run_id)


@pytest.mark.parametrize("cls, field, value", [
    (MLPConfig, "d_in", 2**20 + 1), (MLPConfig, "n_classes", 2**20 + 1),
    (TransformerConfig, "vocab_size", 2**20 + 1), (TransformerConfig, "context", 65537),
])
def test_sizes_have_upper_bounds(cls, field, value):
    base = {"d_in": 4, "n_classes": 2} if cls is MLPConfig else {"vocab_size": 4}
    with pytest.raises(ValueError, match=rf"{field} must be an integer in \[\d+, \d+\], got {value}"):
        cls(**{**base, field: value}).validate()


def test_khop_data_memory_is_bounded():
    with pytest.raises(ValueError, match="WORKBENCH_MAX_DATA_MB"):
        data.check_options("khop", nodes=52, queries=52, n_train=1_000_000, n_val=100_000)
    data.check_options("khop")  # the default fits


# ----------------------------------------------------------------------------- item 13: types

@pytest.mark.parametrize("value", ["no", "yes", 0, 1, None])
def test_tie_embeddings_takes_only_a_bool(value):
    with pytest.raises(ValueError, match=f"tie_embeddings must be True or False, got {value!r}"):
        TransformerConfig(vocab_size=4, tie_embeddings=value).validate()


@pytest.mark.parametrize("cfg, fragment", [
    (lambda: TransformerConfig(vocab_size=3, vocab="abc"), "vocab must be a list of token strings"),
    (lambda: TransformerConfig(vocab_size=3, vocab=[1, 2, 3]), "vocab must be a list of token strings"),
    (lambda: TransformerConfig(vocab_size=4, n_heads=True), "n_heads must be an integer"),
    (lambda: TransformerConfig(vocab_size=4.0), "vocab_size must be an integer"),
    (lambda: TransformerConfig(vocab_size=4, seed=2**32), r"seed must be an integer in \[0, 4294967295\]"),
    (lambda: TransformerConfig(vocab_size=4, glyph_font=3), "glyph_font must be a string"),
    (lambda: MLPConfig(d_in=4, n_classes=2, seed=-1), r"seed must be an integer in \[0, 4294967295\]"),
    (lambda: MLPConfig(d_in=4, n_classes=2, activation=None), "activation must be one of"),
    (lambda: MLPConfig(d_in=True, n_classes=2), "d_in must be an integer"),
])
def test_model_fields_are_type_checked(cfg, fragment):
    with pytest.raises(ValueError, match=fragment):
        cfg().validate()


def test_config_from_dict_names_missing_fields_instead_of_a_type_error():
    with pytest.raises(ValueError, match=r"mlp config is missing field\(s\) \['n_classes'\]"):
        models.config_from_dict({"family": "mlp", "d_in": 4})
    with pytest.raises(ValueError, match="model config must be a dict"):
        models.config_from_dict(5)


@pytest.mark.parametrize("field, value, fragment", [
    ("lr", True, "lr must be a finite number in (0, 10], got True"),
    ("lr", float("nan"), "lr must be a finite number"),
    ("weight_decay", False, "weight_decay must be a finite number"),
    ("steps", 2.0, "steps must be an integer in [1, 10000000], got 2.0"),
    ("batch_size", True, "batch_size must be an integer"),
    ("seed", 2**32, "seed must be an integer in [0, 4294967295], got 4294967296"),
    ("seed", None, "seed must be an integer in [0, 4294967295], got None"),
    ("schedule", None, "schedule must be one of ['constant', 'cosine']"),
])
def test_train_config_types(field, value, fragment):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value}).validate()
    assert fragment in str(e.value)


def test_the_largest_seed_works_end_to_end(digits):
    ds = data.load("digits", seed=2**32 - 1)
    assert ds.spec()["seed"] == 2**32 - 1
    run = wb.train(_tiny_mlp(ds, seed=2**32 - 1), ds, TrainConfig(steps=2, eval_every=2, seed=2**32 - 1))
    assert run.status == "completed"
    with pytest.raises(ValueError, match=r"digits.seed must be in \[0, 4294967295\], got 4294967296"):
        data.load("digits", seed=2**32)


# ----------------------------------------------------------------------------- item 12: None from emptied boxes

def test_the_emptied_hops_box_gives_a_named_error():
    with pytest.raises(ValueError, match=r"khop.hops must be an integer in \[1, 8\], got None"):
        data.load("khop", hops=None)


@pytest.mark.parametrize("name, key", [(n, k) for n in data.names() for k in data.options_spec(n)])
def test_none_for_any_option_is_refused_by_name_or_is_a_documented_value(name, key):
    default, typ, lo, hi = data.options_spec(name)[key]
    documented = name == "text" and key in ("path", "text", "vocab", "corpus")
    if documented:
        small = {"corpus_chars": 2000, "context": 16}
        assert torch.equal(data.load(name, **small, **{key: None}).x_train, data.load(name, **small).x_train)
    else:
        with pytest.raises(ValueError) as e:
            data.check_options(name, **{key: None})
        assert f"{name}.{key} must be" in str(e.value) and "got None" in str(e.value)
        if typ in (int, float):
            assert f"[{lo}, " in str(e.value)


def test_seed_none_and_val_fraction_none_are_refused():
    with pytest.raises(ValueError, match=r"digits.seed must be an integer in \[0, 4294967295\], got None"):
        data.load("digits", seed=None)
    with pytest.raises(ValueError, match=r"text.seed must be an integer"):
        data.load("text", seed=None)
    with pytest.raises(ValueError, match=r"digits.val_fraction must be a number in \[0.05, 0.5\], got None"):
        data.load("digits", val_fraction=None)
    with pytest.raises(ValueError, match=r"text.val_fraction must be a number in \[0.01, 0.5\], got None"):
        data.load("text", val_fraction=None)


@pytest.mark.parametrize("name, options, fragment", [
    ("khop", {"hops": True}, "khop.hops must be an integer in [1, 8], got True"),
    ("khop", {"hops": 2.0}, "khop.hops must be an integer in [1, 8], got 2.0"),
    ("digits", {"val_fraction": True}, "digits.val_fraction must be a number in [0.05, 0.5], got True"),
    ("digits", {"val_fraction": float("nan")}, "digits.val_fraction must be a number"),
    ("modadd", {"p": "97"}, "modadd.p must be an integer in [2, 1000], got '97'"),
    ("text", {"corpus": 3}, "text.corpus must be one of ['arithmetic', 'code', 'grammar'], got 3"),
    ("text", {"text": b"abc"}, "text.text must be a string (decode the uploaded bytes as UTF-8 first)"),
    ("text", {"path": 5}, "text.path must be a file path"),
    ("text", {"vocab": ""}, "text.vocab must be a string of 1 to"),
])
def test_bools_and_wrong_types_are_refused(name, options, fragment):
    with pytest.raises(ValueError) as e:
        data.load(name, **options)
    assert fragment in str(e.value)


# ----------------------------------------------------------------------------- item 3 (engine): text by content

def test_a_text_file_rebuilds_from_its_spec_identically_and_the_spec_has_no_path(tmp_path):
    f = tmp_path / "secret-dir" / "notes.txt"
    f.parent.mkdir()
    f.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    ds = data.load("text", path=str(f), context=16)
    spec = ds.spec()
    assert "path" not in spec and str(tmp_path) not in json.dumps(spec) and "notes" not in json.dumps(spec)
    assert spec["text"] == f.read_text(encoding="utf-8")
    again = data.from_spec(json.loads(json.dumps(spec)), allow_path=False)  # as stored in run.json
    for attr in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(ds, attr), getattr(again, attr))
    assert again.vocab == ds.vocab and again.spec() == spec
    # an independent reference: the windows of the characters, by hand
    text = f.read_text(encoding="utf-8")
    assert ds.decode(ds.x_train[1]) == text[16:32] and ds.decode(ds.y_train[1]) == text[17:33]
    f.unlink()  # the stored spec does not need the file any more
    assert torch.equal(data.from_spec(spec).x_val, ds.x_val)


def test_text_given_as_content_equals_the_same_text_from_a_file(tmp_path):
    text = "abcabd\n" * 100
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    a, b = data.load("text", text=text, context=8), data.load("text", path=f, context=8)
    assert torch.equal(a.x_train, b.x_train) and a.spec() == b.spec()


def test_from_spec_refuses_server_paths_from_the_dashboard(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 50, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        data.from_spec({"name": "text", "path": str(f), "context": 8}, allow_path=False)
    assert str(e.value) == "text datasets from the dashboard come by upload, not as a server path"
    assert data.from_spec({"name": "text", "path": str(f), "context": 8}).n_classes == len(set("hello world "))
    # a spec stored before this change: {"path": None, "corpus": ...}
    old = {"name": "text", "path": None, "context": 16, "val_fraction": 0.1, "vocab": None, "corpus_chars": 2000,
           "seed": 0, "corpus": "arithmetic"}
    assert torch.equal(data.from_spec(old, allow_path=False).x_train,
                       data.load("text", corpus="arithmetic", context=16, corpus_chars=2000).x_train)
    for bad, fragment in [(5, "dataset spec must be a dict"), ({"name": "cifar"}, "name must be one of"),
                          ({"name": "digits", "seed": "x"}, "digits.seed must be an integer"),
                          ({"name": "mix", "parts": []}, "parts must be a list of 1 to 64")]:
        with pytest.raises(ValueError, match=fragment):
            data.from_spec(bad)
    with pytest.raises(ValueError, match="allow_path must be True or False"):
        data.from_spec(old, allow_path="no")
    # the same checks without building (for the run store): every refusal above, and no file is read
    assert data.check_spec(old, allow_path=False) == old
    assert data.check_spec({"name": "text", "path": "/no/such/file", "context": 8})["path"] == "/no/such/file"
    for bad, fragment in [(5, "dataset spec must be a dict"), ({"name": "digits", "steps": 3}, "unknown option"),
                          ({"name": "khop", "hops": None}, "khop.hops must be an integer"),
                          ({"name": "text", "path": "/etc/passwd"}, "not as a server path"),
                          ({"name": "mix", "parts": [{"name": "digits", "seed": -1}]}, "digits.seed must be in")]:
        with pytest.raises(ValueError, match=fragment):
            data.check_spec(bad, allow_path=False)


def test_a_concatenations_spec_rebuilds_it():
    parts = [data.load("text", corpus=c, context=8, corpus_chars=2000, vocab="".join(map(chr, range(32, 127))) + "\n")
             for c in ("grammar", "arithmetic")]
    spec = {"name": "mixture", "parts": [p.spec() for p in parts]}
    ds = data.from_spec(spec)
    assert torch.equal(ds.x_train, torch.cat([p.x_train for p in parts])) and ds.spec() == spec


def test_text_has_exactly_one_source_and_a_size_limit(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="text: give exactly one of path, text or corpus, got text and corpus"):
        data.load("text", text="abc" * 100, corpus="code")
    f = tmp_path / "big.txt"
    f.write_text("x" * 3000, encoding="utf-8")
    monkeypatch.setenv("WORKBENCH_MAX_UPLOAD_MB", str(2048 / 2**20))  # 2 KB
    with pytest.raises(ValueError, match=r"text.path: .* is 0.00 MB, more than the limit .*WORKBENCH_MAX_UPLOAD_MB"):
        data.load("text", path=str(f))
    with pytest.raises(ValueError, match=r"text.text is .* more than the limit .*WORKBENCH_MAX_UPLOAD_MB"):
        data.load("text", text="é" * 1500)  # 1500 characters, 3000 bytes of UTF-8
    assert data.load("text", text="ab" * 500, context=8).spec()["text"] == "ab" * 500
    monkeypatch.delenv("WORKBENCH_MAX_UPLOAD_MB")
    assert data.max_text_bytes() == 2 * 2**20


def test_a_stored_text_run_names_no_path(store, tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("to be or not to be, " * 60, encoding="utf-8")
    ds = data.load("text", path=str(f), context=16)
    model = models.build(models.config_for(ds, d_model=16, n_heads=2, d_mlp=16, n_layers=1))
    run_id = store.save(wb.train(model, ds, TrainConfig(steps=2, eval_every=2)))
    raw = (store.runs_dir / run_id / "run.json").read_text()
    assert str(tmp_path) not in raw and "corpus.txt" not in raw
    again = data.from_spec(store.load(run_id).dataset, allow_path=False)
    assert torch.equal(again.x_train, ds.x_train)


# ----------------------------------------------------------------------------- item 14: model/data pairing

def test_a_5_class_mlp_on_digits_is_refused_up_front(digits):
    model = models.build(MLPConfig(d_in=64, n_classes=5, d_model=16, d_hidden=16, n_layers=1))
    msg = "the model has 5 classes but dataset 'digits' has labels up to 9"
    with pytest.raises(ValueError, match=msg):
        wb.train(model, digits, TrainConfig(steps=1))
    with pytest.raises(ValueError, match=msg):
        wb.evaluate(model, digits)


def test_an_mlp_on_khop_and_a_transformer_on_digits_are_refused(digits, khop):
    mlp = models.build(MLPConfig(d_in=khop.seq_len, n_classes=khop.vocab_size, d_model=8, d_hidden=8))
    with pytest.raises(ValueError, match="model family 'mlp' takes vector data; dataset 'khop' is a sequence dataset"):
        wb.train(mlp, khop, TrainConfig(steps=1))
    tf = models.build(TransformerConfig(vocab_size=10, context=64, d_model=8, n_heads=2, d_mlp=8, n_layers=1))
    with pytest.raises(ValueError, match="model family 'transformer' takes sequence data; dataset 'digits' is a "
                                         "vector dataset"):
        check_pairing(tf, digits)


def test_d_in_context_and_vocabulary_mismatches_are_refused(digits, khop):
    with pytest.raises(ValueError, match="the model takes d_in=40 features but dataset 'digits' has"):
        check_pairing(models.build(MLPConfig(d_in=40, n_classes=10, d_model=8, d_hidden=8)), digits)
    small = dict(d_model=8, n_heads=2, d_mlp=8, n_layers=1)
    with pytest.raises(ValueError, match=f"the model's context is 8 but dataset 'khop' has sequences of length "
                                         f"{khop.seq_len}"):
        check_pairing(models.build(TransformerConfig(vocab_size=khop.vocab_size, context=8, **small)), khop)
    with pytest.raises(ValueError, match=f"the model's vocab_size is 5 but dataset 'khop' has a vocabulary of "
                                         f"{khop.vocab_size} tokens"):
        wb.train(models.build(TransformerConfig(vocab_size=5, context=khop.seq_len, **small)), khop)
    wrong = models.build(TransformerConfig(vocab_size=khop.vocab_size, context=khop.seq_len,
                                           vocab=list(reversed(khop.vocab)), **small))
    with pytest.raises(ValueError, match="the model's vocabulary differs from the vocabulary of dataset 'khop': token 0 is '\?' in the model"):
        check_pairing(wrong, khop)
    check_pairing(models.build(models.config_for(khop, **small)), khop)  # the fitting pair passes


def test_token_ids_outside_the_vocabulary_are_refused(khop):
    x = khop.x_train.clone()
    x[3, 2] = khop.vocab_size + 4  # a hand-made dataset that claims a smaller vocabulary than it uses
    bad = Dataset("hand", "sequence", x, khop.y_train, khop.x_val, khop.y_val, khop.n_classes, "", khop.vocab)
    model = models.build(models.config_for(khop, d_model=8, n_heads=2, d_mlp=8, n_layers=1))
    with pytest.raises(ValueError, match=rf"dataset 'hand' train tokens must be token ids in \[0, "
                                         rf"{khop.vocab_size - 1}\], got {khop.vocab_size + 4}"):
        wb.train(model, bad, TrainConfig(steps=1))
    y = khop.y_val.clone()
    y[0, -1] = -7
    bad = Dataset("hand", "sequence", khop.x_train, khop.y_train, khop.x_val, y, khop.n_classes, "", khop.vocab)
    with pytest.raises(ValueError, match="dataset 'hand' val targets must be class indices"):
        wb.evaluate(model, bad)


def test_evaluate_validates_split_and_max_examples(digits):
    model = _tiny_mlp(digits)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'val'\], got 'test'"):
        wb.evaluate(model, digits, "test")
    with pytest.raises(ValueError, match="max_examples must be an integer >= 0, got -300"):
        wb.evaluate(model, digits, max_examples=-300)
    with pytest.raises(ValueError, match="max_examples must be an integer >= 0, got 2.5"):
        wb.evaluate(model, digits, max_examples=2.5)
    # the reference: a direct computation on the first 100 examples
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(digits.x_val[:100]), digits.y_val[:100]).item()
    assert wb.evaluate(model, digits, max_examples=100)["loss"] == pytest.approx(ref, rel=1e-5)


def test_evaluation_of_long_sequences_is_batched_by_tokens_with_the_same_result():
    ds = data.load("text", corpus_chars=20_000, context=1024)
    model = models.build(models.config_for(ds, d_model=8, n_heads=2, d_mlp=8, n_layers=1))
    one = wb.evaluate(model, ds, batch_size=1)  # one sequence per batch: the reference
    assert wb.evaluate(model, ds)["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert wb.evaluate(model, ds)["acc"] == one["acc"]


# ----------------------------------------------------------------------------- item 15: divergence

@pytest.mark.parametrize("history, n_classes, expected", [
    ([0.3, 1.6e13], 10, True),            # the blow-up
    ([0.3, float("nan")], 10, True),
    ([0.3, float("inf")], 10, True),
    ([1.6e13], 10, True),                 # one evaluation: measured against uniform guessing, ln 10
    ([0.1, 3.0], 10, False),              # ordinary overfitting
    ([0.05, 9.0], 10, False),             # 180x, but below 10
    ([2.0, 12.0], 10, False),             # above 10, but 6x
    ([0.01, 11.0], 10_000, False),        # below twice the loss of guessing among 10,000 (18.4)
    ([0.01, 19.0], 10_000, True),
    ([], 10, False),
])
def test_the_divergence_rule(history, n_classes, expected):
    assert diverged(history, n_classes) is expected


class _BlowUp(wb.Callback):
    """Multiplies every weight by 1e4 after step 10: a forced, finite blow-up."""

    def on_step(self, state):
        if state.step == 10:
            with torch.no_grad():
                for p in state.model.parameters():
                    p.mul_(1e4)


def test_a_forced_blow_up_is_flagged_diverged_not_completed(digits, store):
    cfg = TrainConfig(steps=40, eval_every=5, lr=1e-3)
    control = wb.train(_tiny_mlp(digits), digits, cfg)
    assert control.status == "completed" and "diverged" not in control.meta
    run = wb.train(_tiny_mlp(digits), digits, cfg, callbacks=[_BlowUp()])
    assert run.status == "diverged"
    val = run.metrics.query("split == 'val' and metric == 'loss'")["value"].tolist()
    assert val[-1] > 100 * min(val[:-1]) and val[-1] > 10, val   # the rule holds on the record itself
    assert run.metrics["step"].max() == 10                       # stopped at the evaluation that saw it
    assert run.meta["diverged"]["step"] == 10 and run.meta["diverged"]["loss"] > 10
    run_id = store.save(run)
    assert store.list().set_index("run_id").loc[run_id, "status"] == "diverged"
    assert store.load(run_id).status == "diverged"


def test_a_very_high_learning_rate_is_flagged_diverged(digits):
    run = wb.train(_tiny_mlp(digits, norm="none"), digits, TrainConfig(steps=60, lr=10.0, eval_every=5, grad_clip=0))
    assert run.status == "diverged"
    loss = run.meta["diverged"]["loss"]
    assert loss in ("inf", "nan") or (math.isfinite(loss) and loss > 10)
    json.dumps(run.meta, allow_nan=False)  # JSON-ready for the store


# ----------------------------------------------------------------------------- one refusal vocabulary

class _LooksLikeOne(torch.nn.Module):
    """Has what the old duck-typed checks looked for (blocks, count_flops, perm_axes, a config), is no workbench model."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
        self.config = MLPConfig(d_in=2, n_classes=2)

    def count_flops(self, c):
        pass

    def perm_axes(self):
        return {"axes": {}, "sizes": {}, "heads": {}}


def _refusals(digits):
    from workbench import collapse, compose, flops, growth, learngene, permute, unroll

    fake, mlp = _LooksLikeOne(), _tiny_mlp(digits)
    x, y = digits.x_val[:4], digits.y_val[:4]
    return [
        ("model", lambda: growth.add_layer(fake)), ("model", lambda: growth.freeze(fake, below=1)),
        ("model", lambda: growth.block_table(fake)), ("model", lambda: flops.step_flops(fake, 2)),
        ("model", lambda: collapse.collect(fake, x, y)), ("model", lambda: learngene.fit(fake)),
        ("model", lambda: unroll.gap(fake, x)), ("model", lambda: permute.perm_spec(fake)),
        ("model_a", lambda: permute.check_same_architecture(fake, mlp)),
        ("model_b", lambda: permute.check_same_architecture(mlp, fake)),
    ], [
        ("dataset", lambda: wb.train(mlp, digits.spec(), TrainConfig(steps=1))),
        ("data", lambda: permute.check_model_data(mlp, {"name": "digits"}, "data")),
        ("datasets[1]", lambda: compose.concat({"a": digits, "b": "digits"})),
        ("dataset", lambda: collapse.subsample(x, [1] * 10)),
    ]


def test_not_a_workbench_model_or_dataset_is_one_refusal_everywhere(digits):
    """Every engine function that needs a workbench model (or Dataset) refuses anything else with one
    ValueError in the checks shape (checks.check_model / check_dataset), naming its argument."""
    models_, datasets = _refusals(digits)
    for name, call in models_:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == f"{name} must be a workbench model (ResidualMLP or Transformer), got _LooksLikeOne"
    for name, call in datasets:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(f"{name} must be a workbench Dataset (wb.data.load(...)), got "), str(e.value)
    khop = data.load("khop", nodes=4, n_train=20, n_val=10)
    for call in (lambda: wb.collapse.subsample(khop, [1] * 6), lambda: wb.compose.class_tasks(khop, [[0, 1]])):
        with pytest.raises(ValueError, match=r"^dataset must be a workbench Dataset of vector data, got the sequence "
                                             r"dataset 'khop'$"):
            call()

"""workbench.recipes: frozen presets whose builders give the documented data, model and budget."""
import dataclasses
import math

import pytest

from workbench import recipes


def test_recipes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipes.KHOP.lr = 1.0
    with pytest.raises(TypeError):
        recipes.KHOP.data_options["hops"] = 3
    with pytest.raises(TypeError):
        recipes.COLLAPSE["digits"] = None


def test_khop_recipe_builds_its_task_model_and_budget():
    r = recipes.KHOP
    ds = r.load_data(n_train=200, n_val=50)
    assert ds.options["hops"] == 2 and ds.options["layout"] == "table" and len(ds.x_train) == 200
    cfg = r.model_config(ds, n_layers=1)
    assert (cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_layers) == (32, 2, 64, 1)
    assert cfg.vocab_size == ds.vocab_size and cfg.context == ds.seq_len
    tc = r.train_config()
    assert (tc.steps, tc.batch_size, tc.lr, tc.eval_every, tc.eval_max) == (400, 64, 3e-3, 50, 500)
    assert r.sweep_config().steps == 600 and r.sweep_depths == (1, 2, 3)


def test_collapse_recipe_counts_epochs_in_steps():
    r = recipes.COLLAPSE["mnist1d"]
    tc = r.train_config(n_train=4000, eval_every_epochs=10)
    spe = math.ceil(4000 / 128)  # 32 steps an epoch, by hand
    assert (tc.steps, tc.warmup, tc.eval_every, tc.schedule) == (80 * spe, spe, 10 * spe, "cosine")
    assert recipes.COLLAPSE["digits"].steps_per_epoch(50) == 1  # batch larger than the data: one step


def test_transformer_pair_recipe():
    r = recipes.TRANSFORMER_PAIR
    ds = r.load_data(n_train=100, n_val=20)
    cfg = r.model_config(ds)
    assert (cfg.family, cfg.d_model, cfg.n_heads, cfg.n_layers) == ("transformer", 32, 4, 2)
    assert r.train_config().eval_every == 500 and r.train_config(steps=20).eval_every == 20
    assert r.replace(steps=7).steps == 7 and r.steps == 500


def test_khop_recipe_spans_the_depth_its_task_needs():
    r = recipes.KHOP
    ds = r.load_data(n_train=20, n_val=20)
    opts = r.data_options
    assert ds.seq_len == opts["nodes"] + 1 + opts["queries"]  # f(0..n-1), "|", the queries
    assert r.final_layers >= opts["hops"]  # one look-up per block: the final depth can follow every pointer
    assert min(r.sweep_depths) < max(r.sweep_hops) <= max(r.sweep_depths)  # the sweep has too shallow and deep enough
    assert all(r.load_data(hops=h, n_train=10, n_val=10).options["hops"] == h for h in r.sweep_hops)
    glyph = r.model_config(ds, n_layers=1, embedding="glyph")  # overrides reach the config; vocab comes along
    assert glyph.embedding == "glyph" and glyph.vocab == list(ds.vocab) and glyph.d_model == r.d_model


def test_text_recipe_is_a_char_lm_of_the_documented_size():
    r = recipes.TEXT
    assert dict(r.data_options) == {"context": 32, "corpus_chars": 30000}
    ds = r.load_data()
    assert ds.name == "text" and ds.kind == "sequence" and ds.seq_len == 32 and len(ds.x_train) > 0
    cfg = r.model_config(ds, n_layers=1)
    assert (cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_layers, cfg.vocab_size) == (32, 2, 128, 1, ds.vocab_size)
    tc = r.train_config()
    assert (tc.steps, tc.batch_size, tc.lr, tc.eval_every, tc.eval_max) == (200, 32, 3e-3, 25, 0)
    assert r.final_layers == 2 and r.sweep_hops == r.sweep_depths == ()
    assert r.train_config(steps=7, seed=3).steps == 7 and r.train_config(seed=3).seed == 3


def test_builders_refuse_what_the_configs_refuse():
    with pytest.raises(ValueError, match="steps"):
        recipes.KHOP.train_config(steps=0)
    with pytest.raises(ValueError, match="lr"):
        recipes.TRANSFORMER_PAIR.train_config(lr=-1.0)


def test_overrides_replace_recipe_fields():
    tc = recipes.KHOP.train_config(eval_every=7, lr=1e-2)
    assert (tc.eval_every, tc.lr, tc.steps) == (7, 1e-2, 400)

"""The compose experiment: "base on pooled corpora, then specialists" trained as its code trains it (the
recipe's sizes), the merges' table as their code builds it, and a stop that keeps what was trained."""
import pandas as pd
import pytest
import torch

import workbench as wb
from workbench.experiments import compose


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return compose.train(["grammar", "arithmetic"], steps=3, n_layers=1)


def test_training_follows_the_recipe_and_its_code(trained, run_code):
    base = trained["base"].model
    r = wb.recipes.COMPOSE
    assert (base.config.d_model, base.config.n_heads, base.config.d_mlp, base.config.n_layers) == (r.d_model, r.n_heads,
                                                                                                  r.d_mlp, 1)
    assert list(trained["specialists"]) == ["grammar", "arithmetic"]
    assert all(run.train_config.lr == r.specialist_lr for run in trained["specialists"].values())
    code = compose.as_code(corpora=["grammar", "arithmetic"], steps=3, n_layers=1, chosen=["logit mean", "ties"],
                           options={"density": 0.2, "scale": 1.0})
    scope = run_code(code)
    x = scope["domains"]["grammar"].x_val[:8]
    assert torch.equal(scope["base"](x), base(x))
    for name, run in trained["specialists"].items():
        assert torch.equal(scope["members"][name](x), run.model(x))
    assert set(scope["table"]["model"]) >= {"logit mean", "ties"}


def test_compose_builds_the_chosen_merges_as_their_code_does(trained, store, run_code):
    members = {name: r.model for name, r in trained["specialists"].items()}
    base = trained["base"].model
    domains = wb.compose.shared_text(list(members), context=32, corpus_chars=20_000)
    chosen, options = ["logit mean", "ties", "task arithmetic"], {"density": 0.2, "scale": 1.0}
    out = compose.compose(members, domains, chosen, options, base=base)
    assert list(out["merges"]) == chosen and out["skipped"] == [] and out["cosines"] is not None
    ids = [store.save(r) for r in trained["specialists"].values()]
    base_id = store.save(trained["base"])
    scope = run_code(compose.as_code(specialist_ids=ids, names=list(members), base_id=base_id, chosen=chosen,
                                     options=options))
    pd.testing.assert_frame_equal(scope["table"], out["table"])
    without_base = compose.compose(members, domains, chosen, options)
    assert without_base["skipped"] == ["ties", "task arithmetic"] and list(without_base["merges"]) == ["logit mean"]


def test_a_stop_keeps_the_base():
    stopped = wb.monitor.Monitor()
    stopped.stop()
    out = compose.train(["grammar", "arithmetic"], steps=3, n_layers=1, monitor=stopped)
    assert out["base"].status == "cancelled" and out["specialists"] == {}


def test_the_pages_as_code_boxes_train_and_compose_what_the_page_did(store, run_code, one_thread):
    from workbench.ui import App

    page = App(store=store).pages["Compose"]
    page.train_steps.value, page.n_layers.value = 3, 1
    page.merges.value = ["logit mean", "ties"]
    code = page.as_code()
    assert code == compose.as_code(corpora=["grammar", "arithmetic"], steps=3, n_layers=1, chosen=["logit mean", "ties"],
                                   options=page._options())
    page.train_two(wait=True)
    assert page.train_task.status == "done", page.train_task.error
    scope = run_code(code)
    x = scope["domains"]["grammar"].x_val[:8]
    base = page.datastore.store.load(page.base.value).model
    assert torch.equal(scope["base"](x), base(x))
    page.run_compose(wait=True)
    assert page.compose_task.status == "done", page.compose_task.error
    composed = run_code(page.code.object)
    pd.testing.assert_frame_equal(composed["table"], page.result["table"])

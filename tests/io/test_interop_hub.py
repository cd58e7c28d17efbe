"""interop.open_model and the Hub policy, against a local fake Hub (tests/fakehub.py): never the network.

Hub names are opt-in on a class server, downloads are capped per model and in total from the Hub's
file listing before anything is fetched, a student's download is offered to that student only, a
hanging Hub is left behind at Stop, and opened models are shared through one memory-bounded cache.
"""
import socket
import threading
import time

import pytest
import torch

from helpers.fakehub import FakeHub, Silent
from workbench import interop, roots

REPO = "org/tiny"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny GPT-2 saved as the Hub serves it (config and safetensors), and the model itself (the reference)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}, folder


@pytest.fixture
def hub(tiny_files, monkeypatch, tmp_path):
    fake = FakeHub({REPO: tiny_files[0]})
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", interop.ALLOW_HUB_ENV, interop.HUB_MAX_ENV,
                interop.HUB_CACHE_ENV, roots.ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield fake
    fake.close()


def _same_logits(model, folder):
    from transformers import GPT2LMHeadModel

    reference = GPT2LMHeadModel.from_pretrained(folder).eval()
    x = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        return torch.allclose(model(x).logits, reference(x).logits, atol=1e-6)


def test_a_hub_name_is_downloaded_once_into_the_shared_folder_and_opened(hub, tiny_files, tmp_path):
    cache = interop.ModelCache()
    home = tmp_path / "home"
    opened = interop.open_model(hub=REPO, home=home, holder="page-1", cache=cache)
    assert _same_logits(opened.model, tiny_files[1])
    assert opened.key == ("hub", REPO, hub.sha[REPO]) and opened.label == f"{REPO} @ {hub.sha[REPO][:10]}"
    assert sorted(hub.downloads()) == sorted(tiny_files[0])                 # config, generation config, weights
    assert list(roots.list_models(home=home).values()) == [
        (roots.hub_cache(None, home) / f"models--org--tiny/snapshots/{hub.sha[REPO]}").resolve()]
    again = interop.open_model(hub=REPO, home=home, holder="page-2", cache=cache)
    assert again is opened and len(hub.downloads()) == len(tiny_files[0])  # shared: not loaded or fetched twice
    snap = roots.hub_cache(None, home) / f"models--org--tiny/snapshots/{hub.sha[REPO]}"
    (snap / "model.safetensors").resolve().unlink()                       # a download cut short: no weights
    (snap / "model.safetensors").unlink()
    reopened = interop.open_model(hub=REPO, home=home, cache=interop.ModelCache())
    assert _same_logits(reopened.model, tiny_files[1]) and hub.downloads()[len(tiny_files[0]):] == [
        "model.safetensors"]                                               # only the missing file again


def test_on_a_class_server_hub_names_wait_for_the_teacher_and_a_download_is_the_students_own(hub, tmp_path,
                                                                                              monkeypatch):
    home = tmp_path / "home"
    with pytest.raises(ValueError) as e:
        interop.open_model(hub=REPO, user="alice", home=home, cache=interop.ModelCache())
    assert str(e.value) == interop.HUB_REFUSED and hub.requests == []       # refused before any request
    assert interop.hub_allowed(False)                                        # a laptop: always
    monkeypatch.setenv(interop.ALLOW_HUB_ENV, "1")
    opened = interop.open_model(hub=REPO, user="alice", home=home, cache=interop.ModelCache())
    snap = (roots.hub_cache("alice", home) / f"models--org--tiny/snapshots/{hub.sha[REPO]}").resolve()
    assert snap in roots.list_models(user="alice", home=home).values()
    assert snap not in roots.list_models(user="bob", home=home).values()
    assert snap not in roots.list_models(home=home).values()
    with pytest.raises(ValueError, match="not one of the models offered"):
        interop.open_model(folder=str(snap), user="bob", home=home, cache=interop.ModelCache())
    assert interop.open_model(folder=str(snap), user="alice", home=home, cache=interop.ModelCache()).label == \
        opened.label


def test_downloads_over_the_caps_are_refused_from_the_listing_before_any_file_is_fetched(hub, tiny_files, tmp_path,
                                                                                         monkeypatch):
    home = tmp_path / "home"
    size = sum(len(b) for b in tiny_files[0].values())
    monkeypatch.setenv(interop.HUB_MAX_ENV, str((size - 1) / 2**20))
    with pytest.raises(ValueError, match=r"more than the limit of .* MB for one download \(WORKBENCH_HUB_MAX_MB\)"):
        interop.open_model(hub=REPO, home=home, cache=interop.ModelCache())
    monkeypatch.setenv(interop.HUB_MAX_ENV, str(size / 2**20))
    junk = roots.hub_dir(home) / "users" / "bob" / "junk.bin"               # what is already downloaded counts
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"\0" * 50_000)
    monkeypatch.setenv(interop.HUB_CACHE_ENV, str((50_000 + size - 1) / 2**20))
    with pytest.raises(ValueError, match=r"more than the limit of .* MB \(WORKBENCH_HUB_CACHE_MB\)"):
        interop.open_model(hub=REPO, home=home, cache=interop.ModelCache())
    assert hub.downloads() == []                                             # only the listing was asked for
    monkeypatch.setenv(interop.HUB_CACHE_ENV, str((50_000 + size) / 2**20))
    interop.open_model(hub=REPO, home=home, cache=interop.ModelCache())      # exactly at the caps: fetched
    assert sorted(hub.downloads()) == sorted(tiny_files[0])


def test_a_model_without_safetensors_or_a_file_larger_than_listed_is_not_read(tiny_files, tmp_path, monkeypatch):
    files = dict(tiny_files[0])
    weights = files.pop("model.safetensors")
    for var in ("HF_HUB_OFFLINE", interop.HUB_MAX_ENV, interop.HUB_CACHE_ENV):
        monkeypatch.delenv(var, raising=False)
    pickle_only = FakeHub({REPO: {**files, "pytorch_model.bin": b"\0" * 64}})
    lying = FakeHub({REPO: {**files, "model.safetensors": weights}}, listed_sizes={"model.safetensors": 100})
    try:
        monkeypatch.setenv("HF_ENDPOINT", pickle_only.url)
        with pytest.raises(ValueError, match="no safetensors weights"):
            interop.open_model(hub=REPO, home=tmp_path / "a", cache=interop.ModelCache())
        assert pickle_only.downloads() == []
        monkeypatch.setenv("HF_ENDPOINT", lying.url)
        with pytest.raises(ValueError, match="larger than the Hub's listing says"):
            interop.open_model(hub=REPO, home=tmp_path / "b", cache=interop.ModelCache())
    finally:
        pickle_only.close(), lying.close()


def test_offline_only_what_is_on_disk_opens(hub, tiny_files, tmp_path, monkeypatch):
    home = tmp_path / "home"
    interop.open_model(hub=REPO, home=home, cache=interop.ModelCache())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(hub.requests)
    opened = interop.open_model(hub=REPO, home=home, cache=interop.ModelCache())
    assert _same_logits(opened.model, tiny_files[1]) and len(hub.requests) == asked
    with pytest.raises(ValueError, match="not downloaded yet, and the Hub is offline"):
        interop.open_model(hub="org/other", home=home, cache=interop.ModelCache())
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with socket.socket() as s:                                    # a port nothing listens on: the Hub is down
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    opened = interop.open_model(hub=REPO, home=home, cache=interop.ModelCache())
    assert opened.key == ("hub", REPO, hub.sha[REPO])            # what is on disk still opens
    with pytest.raises(ValueError, match="cannot read its file listing from the Hub"):
        interop.open_model(hub="org/other", home=home, cache=interop.ModelCache())


class _StopAfter:
    """A monitor whose Stop is pressed ``seconds`` after it is made."""

    def __init__(self, seconds):
        self.at, self.messages = time.monotonic() + seconds, []

    @property
    def stopped(self):
        return time.monotonic() >= self.at

    def report(self, progress=None, message="", payload=None):
        self.messages.append(message)


def test_a_hanging_hub_is_left_behind_at_stop(tmp_path, monkeypatch):
    silent = Silent()
    monkeypatch.setenv("HF_ENDPOINT", silent.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monitor = _StopAfter(0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(interop.Stopped):
            interop.open_model(hub=REPO, home=tmp_path, monitor=monitor, cache=interop.ModelCache())
        assert time.monotonic() - t0 < interop.HUB_TIMEOUT / 2   # not the request's own timeout
        assert silent.accepted and any("loading org/tiny" in m for m in monitor.messages)
    finally:
        silent.close()


def _opened(key, mb):
    model = torch.nn.Linear(1, 1)
    return interop.OpenModel(model, None, None, None, key, str(key), int(mb * 2**20))


def test_the_shared_cache_drops_the_oldest_model_no_one_holds_and_loads_each_model_once():
    cache = interop.ModelCache(budget_mb=2.5)
    loads = []

    def load(key):
        def fn():
            loads.append(key)
            time.sleep(0.2)
            return _opened(key, 1)
        return fn

    results = []
    threads = [threading.Thread(target=lambda h=f"h{i}": results.append(cache.open(("a",), load(("a",)), h)))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == [("a",)] and len({id(r) for r in results}) == 1          # three sessions, one load
    cache.open(("b",), load(("b",)), "h0")
    cache.open(("c",), load(("c",)), "h0")                                   # 3 MB held: nothing can go
    assert [e["key"] for e in cache.entries()] == [("a",), ("b",), ("c",)]
    cache.release("h0", ("b",))                                              # b: no one holds it any more
    assert [e["key"] for e in cache.entries()] == [("a",), ("c",)]
    for h in ("h0", "h1", "h2"):
        cache.release(h)
    assert [e["key"] for e in cache.entries()] == [("a",), ("c",)]           # within the budget: kept
    cache.open(("d",), load(("d",)), "h3")                                   # over it: the oldest unheld goes
    assert [e["key"] for e in cache.entries()] == [("c",), ("d",)]
    assert cache.open(("c",), load(("c",)), "h4") is not None and loads.count(("c",)) == 1


def test_open_model_refuses_bad_choices_with_the_field_named(tmp_path):
    for bad in ("../etc/passwd", "/etc", "a/b/c", "", "x" * 300):
        with pytest.raises(ValueError, match="Hub name must look like 'owner/name'"):
            interop.open_model(hub=bad, home=tmp_path, cache=interop.ModelCache())
    with pytest.raises(ValueError, match="not one of the models offered"):
        interop.open_model(folder="/etc", home=tmp_path, cache=interop.ModelCache())
    with pytest.raises(ValueError, match="exactly one of folder or hub"):
        interop.open_model(home=tmp_path)

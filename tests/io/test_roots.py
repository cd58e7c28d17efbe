"""workbench.roots: the model roots, the bounded listing and the resolver that refuses anything outside."""
import os
import re
from pathlib import Path

import pytest

from workbench import roots


def _model(path: Path, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "gpt2"}')
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 8)
    return path


@pytest.fixture
def tree(tmp_path):
    """Two roots with models at known places, and decoys the listing must not offer."""
    a, b, outside = tmp_path / "a", tmp_path / "b", tmp_path / "outside"
    expected = {
        _model(a / "tiny"),
        _model(a / "x" / "y" / "z" / "deep4"),                       # depth 4: listed
        _model(b / "models--openai--gpt2" / "snapshots" / "0123456789abcdef"),
    }
    _model(a / "x" / "y" / "z" / "w" / "deep5")                       # depth 5: not listed
    _model(a / "no-weights", weights=False)                            # config.json only
    (a / "weights-only").mkdir()
    (a / "weights-only" / "model.safetensors").write_bytes(b"\0")
    _model(a / ".hidden")                                              # hidden: skipped
    _model(outside / "secret")
    os.symlink(outside / "secret", a / "escape")                       # a symlink out of the root
    os.symlink(a / "tiny", a / "alias")                                # a symlink inside: same model once
    (a / "loop").mkdir()
    os.symlink(a, a / "loop" / "back")                                 # a cycle: visited once
    link_file_dir = a / "file-escape"                                  # config.json pointing outside
    link_file_dir.mkdir()
    (outside / "config.json").write_text("{}")
    os.symlink(outside / "config.json", link_file_dir / "config.json")
    (link_file_dir / "model.safetensors").write_bytes(b"\0")
    return [a, b], {p.resolve() for p in expected}, outside


def test_listing_finds_the_planted_models_and_nothing_else(tree):
    rs, expected, _ = tree
    found = roots.list_models(rs)
    assert set(found.values()) == expected
    assert len(found) == len(expected)  # the in-root alias did not list the same directory twice
    assert "openai/gpt2 @ 0123456789" in found  # a Hugging Face cache snapshot gets its repository's name


def test_every_listed_model_resolves_to_itself(tree):
    rs, expected, _ = tree
    for label, path in roots.list_models(rs).items():
        assert roots.resolve_model(path, rs) == path
        assert roots.resolve_model(str(path), rs) == path
        assert roots.resolve_model(label, rs) == path


def test_anything_outside_the_roots_is_refused_with_one_message(tree, tmp_path):
    rs, _, outside = tree
    a = rs[0]
    attempts = [
        outside / "secret",                 # a real model directory, outside
        a / "escape",                       # a symlink out of the root
        a / ".." / "outside" / "secret",    # dot-dot
        a / "file-escape",                  # its config.json points outside
        a / "no-weights", a / "weights-only",
        a / "x" / "y" / "z" / "w" / "deep5",  # deeper than MAX_DEPTH
        a / ".hidden",
        "/etc", "/etc/passwd", "/nonexistent/dir", tmp_path / "missing",
        "not a label", "", "a\x00b", 5, None, b"/etc", ["/etc"],
    ]
    for choice in attempts:
        with pytest.raises(ValueError) as info:
            roots.resolve_model(choice, rs)
        assert str(info.value) == roots.REFUSED, choice
    # the message names nothing of the filesystem
    assert "/" not in roots.REFUSED and "exist" not in roots.REFUSED


def test_roots_come_from_the_environment(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(roots.ENV, os.pathsep.join([str(a), "", str(b), str(a)]))
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    shared = (tmp_path / "home" / "hub" / "shared").resolve()   # the dashboard's shared Hub downloads
    assert roots.model_roots() == [a.resolve(), b.resolve(), shared]
    _model(b / "m")
    assert list(roots.list_models().values()) == [(b / "m").resolve()]
    assert roots.resolve_model(b / "m") == (b / "m").resolve()


def test_default_roots_are_the_store_and_the_hugging_face_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(roots.ENV, raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert roots.model_roots() == [(tmp_path / "home").resolve(), (tmp_path / "hf" / "hub").resolve(),
                                   (tmp_path / "home" / "hub" / "shared").resolve()]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert roots.model_roots()[1] == (tmp_path / "cache").resolve()
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert roots.model_roots()[1] == (tmp_path / "user" / ".cache" / "huggingface" / "hub").resolve()


def test_a_real_hugging_face_cache_layout_with_blob_symlinks(tmp_path):
    """In the hub cache the snapshot's files are symlinks into blobs/ (inside the same root): allowed."""
    hub = tmp_path / "hub"
    blobs = hub / "models--gpt2" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "c0nf").write_text("{}")
    (blobs / "we1ghts").write_bytes(b"\0")
    snap = hub / "models--gpt2" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    os.symlink(blobs / "c0nf", snap / "config.json")
    os.symlink(blobs / "we1ghts", snap / "model.safetensors")
    assert roots.list_models([hub]) == {"gpt2 @ abc": snap.resolve()}


def test_the_walk_is_bounded(tmp_path, monkeypatch):
    root = tmp_path / "r"
    for i in range(50):
        (root / f"d{i:02d}").mkdir(parents=True)
    _model(root / "zz")
    monkeypatch.setattr(roots, "MAX_ENTRIES", 10)
    assert roots.list_models([root]) == {}  # stopped after 10 entries, before reaching zz
    monkeypatch.setattr(roots, "MAX_ENTRIES", 1000)
    assert list(roots.list_models([root]).values()) == [(root / "zz").resolve()]


def _snapshot(cache: Path, repo: str, rev: str) -> Path:
    """A Hugging Face cache snapshot as hf_hub_download leaves it: files are relative links into blobs/."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / f"conf-{rev}").write_text('{"model_type": "gpt2"}')
    (folder / "blobs" / f"weights-{rev}").write_bytes(b"\0" * 8)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    os.symlink(f"../../blobs/conf-{rev}", snap / "config.json")
    os.symlink(f"../../blobs/weights-{rev}", snap / "model.safetensors")
    return snap


def test_a_users_downloads_are_offered_to_that_user_only_until_a_teacher_shares_them(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.delenv(roots.ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    alice = _snapshot(roots.hub_cache("alice", home), "org/tiny", "r1").resolve()
    planted = _model(roots.hub_cache("alice", home) / "m").resolve()   # 4 levels below the home root
    label = "org/tiny @ r1"
    assert roots.list_models(user="alice", home=home)[label] == alice
    assert planted in roots.list_models(user="alice", home=home).values()
    for other in ("bob", None):                                     # another student; no sign-in
        offered = roots.list_models(user=other, home=home).values()
        assert alice not in offered and planted not in offered
        for choice in (alice, planted, label):
            with pytest.raises(ValueError, match=re.escape(roots.REFUSED)):
                roots.resolve_model(choice, user=other, home=home)
    monkeypatch.setenv(roots.ENV, str(tmp_path))                    # a configured root above the home
    assert not {alice, planted} & set(roots.list_models(user="bob", home=home).values())
    monkeypatch.delenv(roots.ENV)
    assert roots.resolve_model(alice, user="alice", home=home) == alice
    assert roots.label_of(alice, user="alice", home=home) == label

    rows = roots.user_downloads(home)
    assert {(r["user"], r["label"], r["repo"]) for r in rows} >= {("alice", label, "models--org--tiny")}
    carol = _snapshot(roots.hub_cache("carol", home), "org/tiny", "r2").resolve()
    shared = roots.share_model("alice", "models--org--tiny", home)
    assert roots.share_model("carol", "models--org--tiny", home) == shared   # merged: both revisions
    for user in ("bob", None, "alice"):
        offered = roots.list_models(user=user, home=home)
        assert {offered["org/tiny @ r1"], offered["org/tiny @ r2"]} == {shared.resolve() / "snapshots" / "r1",
                                                                       shared.resolve() / "snapshots" / "r2"}
        assert (offered["org/tiny @ r2"] / "model.safetensors").read_bytes() == b"\0" * 8   # links still hold
    assert not alice.exists() and not carol.exists()
    with pytest.raises(ValueError, match="has no download"):
        roots.share_model("alice", "models--org--tiny", home)
    for bad in ("../users/bob", "models--x/../..", "", "models--"):
        with pytest.raises(ValueError, match="repo must be"):
            roots.share_model("alice", bad, home)
    with pytest.raises(ValueError, match="user must be"):
        roots.hub_cache("../bob", home)

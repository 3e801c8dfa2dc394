"""graphprune.save / graphprune.load: safetensors weights + a JSON pruning spec, no pickle."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import graphprune
from graphprune.io import persist
from graphprune.models import get_model

from conftest import size_attrs, state_snapshot

safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _snapshot(model: nn.Module) -> tuple:
    return state_snapshot(model), size_attrs(model)


def _assert_unchanged(model: nn.Module, snapshot: tuple) -> None:
    state, attrs = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert now[key].shape == value.shape and torch.equal(now[key], value), key
    assert size_attrs(model) == attrs


def _pruned(name: str, ratio: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    model = get_model(name)
    graphprune.prune(model, ratio, X[:1])
    with torch.no_grad():  # non-trivial buffers, so that they are checked too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _pruned("resnet20")
    path = tmp_path_factory.mktemp("persist") / "resnet20.safetensors"
    graphprune.save(model, path)
    return model, path


def _rewrite(src, dst, *, spec=None, text=None, digest=None, tensors=None, data_digest=True):
    """Copy a saved file with an edited spec (and, unless given, a matching checksum) and matching data digest."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if spec is not None:
        text = json.dumps(spec)
    text = metadata[persist.SPEC_KEY] if text is None else text
    import hashlib

    tensors = tensors if tensors is not None else stored
    metadata = {persist.SPEC_KEY: text, persist.DIGEST_KEY: digest or hashlib.sha256(text.encode()).hexdigest()}
    if data_digest:
        metadata[persist.DATA_DIGEST_KEY] = persist._data_digest(tensors)
    safetensors_torch.save_file(tensors, str(dst), metadata=metadata)
    return dst


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "mobilenet_v2"])
def test_round_trip_is_exact(tmp_path, name):
    model = _pruned(name)
    path = tmp_path / f"{name}.safetensors"
    graphprune.save(model, path)
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind
    fresh = get_model(name).eval()
    assert graphprune.load(fresh, path) is fresh
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    for (key, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), key
    assert size_attrs(fresh) == size_attrs(model)
    assert all(isinstance(p, nn.Parameter) for p in fresh.parameters())


def test_file_layout(saved):
    model, path = saved
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    spec = json.loads(metadata[persist.SPEC_KEY])
    assert spec["format"] == persist.FORMAT and spec["version"] == persist.VERSION and spec["model"] == "CifarResNet"
    assert keys == set(model.state_dict()) == set(spec["tensors"])
    assert spec["tensors"]["conv1.weight"]["shape"] == list(model.conv1.weight.shape)
    assert spec["modules"]["conv1"] == {"type": "Conv2d", "attributes": {
        "in_channels": 3, "out_channels": model.conv1.out_channels, "groups": 1,
        "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "output_padding": [0, 0]}}
    assert persist.DATA_DIGEST_KEY in metadata
    assert spec["modules"]["bn1"]["attributes"]["num_features"] == model.bn1.num_features < 16


def test_load_does_not_unpickle(saved, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("load must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model, path = saved
    fresh = graphprune.load(get_model("resnet20").eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def _rejects(path, model=None, match=None):
    model = model if model is not None else get_model("resnet20")
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        graphprune.load(model, path)
    _assert_unchanged(model, snapshot)


def test_wrong_model(saved):
    _rejects(saved[1], get_model("resnet56"), match="does not fit")
    _rejects(saved[1], get_model("vgg11_bn"), match="does not fit")


def test_smaller_fresh_model_is_rejected(saved, tmp_path):
    """A file whose tensors are larger than the fresh model's cannot come from pruning it."""
    path = tmp_path / "big.safetensors"
    graphprune.save(get_model("resnet20", num_classes=100), path)
    _rejects(path, get_model("resnet20", num_classes=10), match="never larger")


def test_truncated_file(saved, tmp_path):
    data = saved[1].read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        _rejects(path, match="truncated or corrupted")


def test_garbage_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    _rejects(garbage)
    foreign = tmp_path / "foreign.safetensors"
    safetensors_torch.save_file(get_model("resnet20").state_dict(), str(foreign))
    _rejects(foreign, match="no graphprune pruning spec")
    with pytest.raises(FileNotFoundError):
        graphprune.load(get_model("resnet20"), tmp_path / "missing.safetensors")


def test_tampered_spec_bytes(saved, tmp_path):
    """Editing the JSON in place (same length, still valid JSON) breaks its checksum."""

    def edit(data: bytearray) -> None:
        header_len = int.from_bytes(data[:8], "little")
        header = data[8 : 8 + header_len].decode()
        needle = '\\"num_features\\":'
        at = header.index(needle) + len(needle)
        header = header[:at] + ("7" if header[at] != "7" else "6") + header[at + 1 :]
        data[8 : 8 + header_len] = header.encode()

    _rejects(_edited(saved[1], tmp_path / "tampered.safetensors", edit), match="the pruning spec does not match its checksum")


def _edited(src, dst, edit):
    """A copy of the file ``src`` at ``dst`` with its bytes changed by ``edit(bytearray)``."""
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def test_tampered_spec_with_matching_checksum(saved, tmp_path):
    model, src = saved
    with safe_open(str(src), framework="pt") as f:
        spec = json.loads(f.metadata()[persist.SPEC_KEY])

    bad_attr = json.loads(json.dumps(spec))
    bad_attr["modules"]["layer1.0.conv1"]["attributes"]["out_channels"] += 1
    _rejects(_rewrite(src, tmp_path / "attr.safetensors", spec=bad_attr), match="layer1.0.conv1")

    bad_shape = json.loads(json.dumps(spec))
    bad_shape["tensors"]["fc.weight"]["shape"][1] -= 1
    _rejects(_rewrite(src, tmp_path / "shape.safetensors", spec=bad_shape), match="fc.weight")

    bad_type = json.loads(json.dumps(spec))
    bad_type["modules"]["bn1"]["type"] = "LayerNorm"
    _rejects(_rewrite(src, tmp_path / "type.safetensors", spec=bad_type), match="bn1")

    bad_value = json.loads(json.dumps(spec))
    bad_value["modules"]["bn1"]["attributes"]["num_features"] = "12"
    _rejects(_rewrite(src, tmp_path / "value.safetensors", spec=bad_value), match="bn1")

    _rejects(_rewrite(src, tmp_path / "json.safetensors", text="{not json"), match="JSON")
    _rejects(_rewrite(src, tmp_path / "version.safetensors", spec={**spec, "version": 99}), match="version")

    missing = {k: v for k, v in model.state_dict().items() if k != "fc.bias"}
    _rejects(_rewrite(src, tmp_path / "missing.safetensors", tensors=missing), match="stored tensors")


def test_failure_while_applying_rolls_back(saved, monkeypatch):
    real_plan = persist._plan

    def plan_then_break(model, spec, stored, path):
        values, changes = real_plan(model, spec, stored, path)
        return values, changes + [(model.fc, "weight", "not a tensor")]  # setattr raises TypeError last

    monkeypatch.setattr(persist, "_plan", plan_then_break)
    _rejects(saved[1], match="restored")


def test_tied_weights_and_other_layers(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.norm = nn.LayerNorm(8)
            self.group = nn.GroupNorm(2, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            h = self.norm(self.embed(tokens))
            h = self.group(h.transpose(1, 2)).transpose(1, 2)
            return self.head(h)

    torch.manual_seed(0)
    model = Tied().eval()
    tokens = torch.randint(0, 10, (2, 5))
    report = graphprune.analyze(model, tokens)
    group = next(g for g in report.prunable_groups if "embed" in g.layers())
    group.prune([0, 1, 4, 5] if group.size == 8 else [0])
    assert model.embed.embedding_dim < 8
    path = tmp_path / "tied.safetensors"
    graphprune.save(model, path)
    fresh = Tied().eval()
    graphprune.load(fresh, path)
    assert fresh.head.weight is fresh.embed.weight
    assert fresh.norm.normalized_shape == model.norm.normalized_shape and isinstance(fresh.norm.normalized_shape, tuple)
    assert (fresh.group.num_channels, fresh.group.num_groups) == (model.group.num_channels, model.group.num_groups)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


def test_damaged_weights_are_detected(saved, tmp_path):
    """Flipping one byte of the stored tensor data (not the spec) breaks the data checksum."""

    def flip(data: bytearray) -> None:
        data[-3] ^= 0x40

    _rejects(_edited(saved[1], tmp_path / "flipped.safetensors", flip),
             match="is damaged: the stored weights do not match their checksum")


def test_files_of_version_1_still_load(saved, tmp_path):
    """Version 1 had no data digest and listed only the table's size attributes."""
    model, src = saved
    with safe_open(str(src), framework="pt") as f:
        spec = json.loads(f.metadata()[persist.SPEC_KEY])
    names = {"in_channels", "out_channels", "groups", "num_features", "in_features", "out_features"}
    spec["version"] = 1
    spec["modules"] = {name: {**entry, "attributes": {k: v for k, v in entry["attributes"].items() if k in names}}
                       for name, entry in spec["modules"].items()}
    path = _rewrite(src, tmp_path / "v1.safetensors", spec=spec, data_digest=False)
    fresh = graphprune.load(get_model("resnet20").eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_paths_that_are_not_files(saved, tmp_path):
    model, path = saved
    nested = tmp_path / "new" / "dirs" / "model.safetensors"
    graphprune.save(model, nested)  # missing parent directories are created
    assert nested.is_file()
    with pytest.raises(IsADirectoryError, match="is a directory; give the path of a file"):
        graphprune.save(model, tmp_path)
    with pytest.raises(IsADirectoryError, match="cannot load .* is a directory"):
        graphprune.load(get_model("resnet20"), tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"cannot write {blocker / 'model.safetensors'}") as info:
        graphprune.save(model, blocker / "model.safetensors")
    assert ".graphprune-" not in str(info.value) and ".tmp" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "new"]  # no temporary file left anywhere


def test_norms_without_affine_parameters_keep_their_count_and_round_trip(tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.InstanceNorm2d(8, track_running_stats=True),
                             nn.Conv2d(8, 4, 1)).eval()

    model, x = build(), torch.randn(2, 3, 8, 8)
    graphprune.prune(model, 0.5, x)
    assert model[1].num_features == model[1].running_mean.numel() == 4
    assert model[2].num_features == model[2].running_mean.numel() == 4
    graphprune.save(model, tmp_path / "norms.safetensors")
    fresh = graphprune.load(build(), tmp_path / "norms.safetensors")
    assert fresh[1].num_features == 4 and torch.equal(fresh(x), model(x))


def test_load_into_a_model_on_the_meta_device_is_refused(saved):
    with torch.device("meta"):
        model = get_model("resnet20")
    with pytest.raises(ValueError, match="meta device, which hold no values; materialise it first"):
        graphprune.load(model, saved[1])


def test_save_writes_regular_files_only_and_through_links(saved, tmp_path):
    model, _ = saved
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="it is not a regular file"):
        graphprune.save(model, fifo)
    target, link = tmp_path / "target.safetensors", tmp_path / "link.safetensors"
    target.write_bytes(b"old")
    link.symlink_to(target)
    graphprune.save(model, link)
    assert link.is_symlink() and graphprune.load(get_model("resnet20").eval(), target) is not None
    umask = os.umask(0o022)
    try:
        graphprune.save(model, tmp_path / "mode.safetensors")
    finally:
        os.umask(umask)
    assert (tmp_path / "mode.safetensors").stat().st_mode & 0o777 == 0o644  # as open() creates files


class _Cached(nn.Module):
    """A non-persistent buffer that a forward replaces with a larger one (a cache, as ConViT's
    ``rel_indices``, whose channels may be pruned), and one that pruning shrinks (as BEiT's
    ``k_bias``): both load as saved."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("cache", torch.zeros(1), persistent=False)
        self.register_buffer("k_bias", torch.zeros(4), persistent=False)


def test_non_persistent_buffers_are_saved_and_loaded_as_saved(tmp_path):
    model = _Cached()
    model.cache = torch.arange(7.0)  # grown by a forward
    model.k_bias = torch.ones(2)  # shrunk by pruning
    graphprune.save(model, tmp_path / "m.safetensors")
    fresh = graphprune.load(_Cached(), tmp_path / "m.safetensors")
    assert torch.equal(fresh.cache, torch.arange(7.0)) and torch.equal(fresh.k_bias, torch.ones(2))
    assert torch.equal(fresh.fc.weight, model.fc.weight)

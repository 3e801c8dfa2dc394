"""graphprune.workflow.callbacks: the group regulariser and a pruning schedule inside Hugging Face's
Trainer and Lightning, and prune_optimizer_state (optimizer state sliced to the kept channels)."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import graphprune
from graphprune.workflow.callbacks import PruningHooks, check_schedule
from graphprune.workflow.optimizer_state import prune_optimizer_state


def small_cnn(classes: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def images(n: int = 32):
    x = torch.randn(n, 3, 6, 6)
    return x, (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()  # learnable labels


def penalty(model: nn.Module, x) -> float:
    """The plain group-norm penalty (coefficient 1) of ``model``'s prunable groups."""
    with torch.no_grad():
        return float(graphprune.GroupRegularizer(model, x, coefficient=1.0).penalty())


def train_steps(model, optimizer, x, y, steps: int) -> list:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----- prune_optimizer_state
@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                  lambda p: torch.optim.Adam(p, lr=1e-2)], ids=["sgd-momentum", "adam"])
def test_optimizer_state_is_sliced_to_the_kept_positions(make):
    model, (x, y) = small_cnn(), images()
    optimizer = make(model.parameters())
    train_steps(model, optimizer, x, y, 3)
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    report = graphprune.analyze(model, x[:1])
    graphprune.prune(model, 0.5, report=report)
    kept = report.session.surgery.kept_positions()
    sliced = prune_optimizer_state(optimizer, model, kept)
    checked = 0
    for (module, attribute), dims in kept.items():
        parameter = model.get_submodule(module)._parameters.get(attribute)
        if parameter is None:
            continue  # a buffer (BatchNorm's running statistics): no optimizer state
        for key, old in before[id(parameter)].items():
            new = optimizer.state[parameter][key]
            if old.dim() == 0:  # Adam's step stays
                assert torch.equal(new, old)
                continue
            for dim, positions in dims.items():
                old = old.index_select(dim, torch.as_tensor(positions))
            assert new.shape == parameter.shape and torch.equal(new, old)
            checked += 1
    assert checked == sliced > 0
    assert prune_optimizer_state(optimizer, model, kept) == 0  # already sliced: nothing to do
    losses = train_steps(model, optimizer, x, y, 6)  # the same optimizer goes on
    assert losses[-1] < losses[0]
    assert all(v.shape == p.shape for p in model.parameters() for v in optimizer.state[p].values() if v.dim())


def test_optimizer_state_that_no_slice_fits():
    model, (x, y) = small_cnn(), images()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, x, y, 1)
    conv = model[0].weight
    optimizer.state[conv]["row_statistics"] = torch.ones(8)  # a factored state, as Adafactor keeps
    report = graphprune.analyze(model, x[:1])
    graphprune.prune(model, 0.5, report=report)
    kept = report.session.surgery.kept_positions()
    moments = optimizer.state[model[3].weight]["exp_avg"].shape
    with pytest.raises(ValueError, match=r"optimizer state 'row_statistics' of 0.weight has shape \(8,\)"):
        prune_optimizer_state(optimizer, model, kept)
    assert optimizer.state[model[3].weight]["exp_avg"].shape == moments  # nothing changed
    assert prune_optimizer_state(optimizer, model, kept, reset_unknown=True) > 0
    assert conv not in optimizer.state  # reset: Adam starts it afresh
    train_steps(model, optimizer, x, y, 2)


def test_prune_optimizer_state_errors():
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        prune_optimizer_state(object(), model, {})
    with pytest.raises(TypeError, match="kept must be a mapping"):
        prune_optimizer_state(optimizer, model, [("0", "weight")])
    with pytest.raises(TypeError, match=r"kept's keys must be \(module name, attribute\) pairs"):
        prune_optimizer_state(optimizer, model, {"0.weight": {0: [0]}})
    with pytest.raises(ValueError, match="kept names conv.weight, which is no parameter or buffer of Sequential"):
        prune_optimizer_state(optimizer, model, {("conv", "weight"): {0: [0]}})
    with pytest.raises(ValueError, match="kept names 0.scale, which is no parameter or buffer"):
        prune_optimizer_state(optimizer, model, {("0", "scale"): {0: [0]}})


# ----- options, checked when the callback is built
@pytest.mark.parametrize("options, error, message", [
    ({"schedule": {2: 0.5, 4: 0.3}}, ValueError, "ratios must increase strictly with the epoch"),
    ({"schedule": {2: 0.3, 4: 0.3}}, ValueError, "ratios must increase strictly with the epoch"),
    ({"schedule": {2: 1.0}}, ValueError, r"schedule\[2\] must lie in \(0, 1\), got 1.0"),
    ({"schedule": {2: -0.1}}, ValueError, r"schedule\[2\] must lie in \(0, 1\), got -0.1"),
    ({"schedule": {2: 0.0}}, ValueError, r"schedule\[2\] must lie in \(0, 1\), got 0.0"),
    ({"schedule": {2: "0.5"}}, TypeError, r"schedule\[2\] must be a real number"),
    ({"schedule": {0: 0.5}}, ValueError, "schedule's epochs must be at least 1"),
    ({"schedule": {-1: 0.5}}, ValueError, "schedule's epochs must be at least 1"),
    ({"schedule": {1.5: 0.5}}, TypeError, "schedule's epochs must be integers"),
    ({"schedule": {True: 0.5}}, TypeError, "schedule's epochs must be integers"),
    ({"schedule": [0.3, 0.5]}, TypeError, "schedule must be a non-empty mapping"),
    ({"schedule": {}}, TypeError, "schedule must be a non-empty mapping"),
    ({}, ValueError, "nothing to do"),
    ({"regularizer": {"coefficient": -1.0}}, ValueError, "coefficient must be >= 0"),
    ({"regularizer": {"lr": 0.1}}, ValueError, "regularizer may set only coefficient"),
    ({"regularizer": {"coefficient": 1e-3, "delta": 1e-2}}, ValueError, "delta sets growing regularisation"),
    ({"regularizer": {"target_ratio": 0.5}, "schedule": {1: 0.5}}, ValueError, "target_ratio comes from the schedule"),
    ({"regularizer": 1e-3}, TypeError, "regularizer must be a mapping"),
    ({"schedule": {1: 0.5}, "prune_kwargs": {"ratio": 0.3}}, ValueError, "prune_kwargs may not set ratio"),
    ({"schedule": {1: 0.5}, "prune_kwargs": {"steps": 2}}, ValueError, "prune_kwargs may not set steps"),
    ({"schedule": {1: 0.5}, "prune_kwargs": {"uniformly": True}}, ValueError, "does not take: uniformly"),
    ({"schedule": {1: 0.5}, "criterion": "l7"}, ValueError, "unknown criterion 'l7'"),
    ({"schedule": {1: 0.5}, "module": 3}, TypeError, "module must be the dotted name"),
])
def test_bad_options_fail_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        PruningHooks(None, **options)


def test_schedule_is_sorted_and_the_default_criterion_follows_the_regulariser():
    assert check_schedule({4: 0.5, 2: 0.3}) == {2: 0.3, 4: 0.5}
    assert PruningHooks(schedule={1: 0.5}).criterion == "l1"
    assert PruningHooks(schedule={1: 0.5}, regularizer={"coefficient": 1e-3}).criterion == "group_norm"
    assert PruningHooks(regularizer={"mode": "bn_scale"}).criterion == "bn_scale"


def test_import_graphprune_needs_neither_library():
    code = ("import sys, graphprune, graphprune.workflow.callbacks; "
            "assert not {'transformers', 'lightning', 'pytorch_lightning'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----- Hugging Face Trainer
class _Classifier(nn.Module):
    """A model the Trainer takes: keyword inputs, a dict with ``loss``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"logits": logits} if labels is None else {"loss": nn.functional.cross_entropy(logits, labels),
                                                          "logits": logits}


def _hf_trainer(model, data, callbacks, tmp_path, epochs: int, **options):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(str(tmp_path / "run"), num_train_epochs=epochs, learning_rate=1e-2,
                                          per_device_train_batch_size=4, use_cpu=True, report_to=[], seed=0,
                                          save_strategy="no", logging_steps=1, disable_tqdm=True, **options)
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def _recorder(base: type, *events: str) -> type:
    """A callback class that records the parameter count at ``events``: ``self.counts``."""
    def record(self, *args, **kwargs):
        self.counts.append(graphprune.count_parameters(self.model))
    attributes = {event: record for event in events}
    attributes["__init__"] = lambda self, model: (setattr(self, "model", model), setattr(self, "counts", []))[0]
    return type("Recorder", (base,), attributes)


def test_hf_trainer_regularizer_shrinks_the_groups(tmp_path):
    callbacks = pytest.importorskip("graphprune.workflow.callbacks")
    pytest.importorskip("transformers")
    x = torch.randn(32, 8)
    data = [{"x": row, "labels": label} for row, label in zip(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())]
    plain = _Classifier()
    sparse = copy.deepcopy(plain)
    hook = callbacks.HFPruningCallback({"x": x[:1]}, regularizer={"coefficient": 0.02})
    _hf_trainer(plain, data, [], tmp_path, 2).train()
    _hf_trainer(sparse, data, [hook], tmp_path, 2).train()
    assert hook.history == [] and hook.hooks.regularizer is not None
    assert penalty(sparse.net, x[:1]) < 0.9 * penalty(plain.net, x[:1])


def _counting_tokens(n: int = 16, length: int = 8, vocab: int = 64) -> torch.Tensor:
    """Sequences that count up from a random start: a causal LM learns them quickly."""
    return (torch.randint(0, vocab, (n, 1)) + torch.arange(length)) % vocab


def test_hf_trainer_prunes_on_schedule_and_keeps_training(tmp_path):
    transformers = pytest.importorskip("transformers")
    callbacks = pytest.importorskip("graphprune.workflow.callbacks")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, head_dim=8)
    llm = transformers.LlamaForCausalLM(config)
    ids = _counting_tokens()
    hook = callbacks.HFPruningCallback({"input_ids": ids[:1]}, schedule={1: 0.25, 2: 0.5},
                                       regularizer={"coefficient": 1e-3, "delta": 1e-2},
                                       prune_kwargs={"prune_heads": True, "uniform": True})
    recorder = _recorder(transformers.TrainerCallback, "on_train_begin", "on_epoch_end")(llm)
    regularizers = []

    def look(self, *args, **kwargs):  # the regulariser of each epoch fits the model as the epoch starts
        regularizers.append(hook.hooks.regularizer)
        if hook.hooks.regularizer is not None:
            hook.hooks.regularizer.check()
    probe = type("Probe", (transformers.TrainerCallback,), {"on_epoch_begin": look})()
    trainer = _hf_trainer(llm, [{"input_ids": row, "labels": row} for row in ids], [hook, recorder, probe], tmp_path,
                          3, lr_scheduler_type="constant")
    trainer.train()
    start, *ends = recorder.counts
    assert [r["epoch"] for r in hook.history] == [1, 2]
    assert ends[0] == hook.history[0]["parameters"] < start  # pruned at the end of epoch 1, exactly then
    assert ends[1] == hook.history[1]["parameters"] < ends[0]
    assert ends[2] == ends[1] == graphprune.count_parameters(llm)  # nothing pruned after epoch 2
    # a fresh regulariser after the first pruning (on the pruned groups), none after the last
    assert regularizers[0] is not regularizers[1] and regularizers[2] is None
    assert regularizers[1].growing and regularizers[1].target_ratio == pytest.approx(1 / 3)
    state = trainer.optimizer.state
    assert all(v.shape == p.shape for p in llm.parameters() for v in state[p].values() if v.dim())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and h["epoch"] > 2]
    assert len(losses) == 4 and losses[-1] < losses[0]  # after the last pruning, the loss goes down
    llm.save_pretrained(tmp_path / "pruned")  # the config follows the pruning (uniform=True)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    assert torch.equal(again(ids).logits, llm(ids).logits)
    graphprune.save(llm, tmp_path / "pruned.safetensors")
    restored = graphprune.load(transformers.LlamaForCausalLM(config), tmp_path / "pruned.safetensors")
    assert torch.equal(restored(ids).logits, llm(ids).logits)


def test_hf_schedule_beyond_training_warns(tmp_path):
    callbacks = pytest.importorskip("graphprune.workflow.callbacks")
    pytest.importorskip("transformers")
    x = torch.randn(8, 8)
    data = [{"x": row, "labels": torch.tensor(0)} for row in x]
    hook = callbacks.HFPruningCallback({"x": x[:1]}, schedule={1: 0.25, 5: 0.5})
    with pytest.warns(UserWarning, match=r"not pruned at epochs \[5\] of the schedule \(training ran 2 epochs\)"):
        _hf_trainer(_Classifier(), data, [hook], tmp_path, 2).train()
    assert [r["epoch"] for r in hook.history] == [1]


# ----- Lightning
def _lightning_module(L):
    class Classifier(L.LightningModule):
        def __init__(self, optimizer: str = "adam"):
            super().__init__()
            self.net, self.optimizer, self.losses = small_cnn(), optimizer, []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, index):
            loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            if self.optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Classifier


def _fit(L, module, callbacks, epochs: int, x, y) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec|does not have many workers).*")
        trainer.fit(module, loader)
    return trainer


def test_lightning_regularizer_shrinks_the_groups():
    L = pytest.importorskip("lightning.pytorch")
    from graphprune.workflow.callbacks import LightningPruningCallback

    x, y = images()
    plain = _lightning_module(L)("sgd")
    sparse = copy.deepcopy(plain)
    hook = LightningPruningCallback(x[:1], regularizer={"coefficient": 0.5}, module="net")
    _fit(L, plain, [], 2, x, y)
    _fit(L, sparse, [hook], 2, x, y)
    assert hook.hooks.model is sparse.net
    assert penalty(sparse.net, x[:1]) < 0.9 * penalty(plain.net, x[:1])


def test_lightning_prunes_on_schedule_and_keeps_training(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from graphprune.workflow.callbacks import LightningPruningCallback

    x, y = images()
    module = _lightning_module(L)()
    hook = LightningPruningCallback(x[:1], schedule={1: 0.25, 2: 0.5}, regularizer={"coefficient": 1e-3, "delta": 1e-2},
                                    module="net")
    recorder = _recorder(L.Callback, "on_train_start", "on_train_epoch_end")(module)
    trainer = _fit(L, module, [hook, recorder], 3, x, y)
    start, *ends = recorder.counts
    assert [r["epoch"] for r in hook.history] == [1, 2]
    assert ends[0] == hook.history[0]["parameters"] + 0 * start < start  # the net is the whole of the module's params
    assert start > ends[0] > ends[1] == ends[2]
    assert (module.net[0].out_channels, module.net[3].out_channels) == (4, 8)
    assert hook.hooks.regularizer is None  # none after the last pruning
    optimizer = trainer.optimizers[0]
    assert all(v.shape == p.shape for p in module.parameters() for v in optimizer.state[p].values() if v.dim())
    after = module.losses[-4:]  # epoch 3: 4 batches after the last pruning
    assert after[-1] < after[0]
    graphprune.save(module.net, tmp_path / "net.safetensors")
    restored = graphprune.load(small_cnn(), tmp_path / "net.safetensors")
    assert torch.equal(restored.eval()(x), module.net.eval()(x))


def test_pytorch_lightning_callback_class():
    pl = pytest.importorskip("pytorch_lightning")
    from graphprune.workflow.callbacks import lightning_callback_class

    cls = lightning_callback_class("pytorch_lightning")
    assert issubclass(cls, pl.Callback) and cls is lightning_callback_class("pytorch_lightning")
    assert isinstance(cls(schedule={1: 0.5}), pl.Callback)
    with pytest.raises(ValueError, match="package must be 'lightning.pytorch' or 'pytorch_lightning'"):
        lightning_callback_class("lightning")

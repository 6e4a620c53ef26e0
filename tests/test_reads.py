"""The plain settings one eager call reads, wherever they live (``moecc/capture_reads.py``)."""

import enum

import pytest
import torch
from torch import nn

from moecc.capture_reads import baked, recording


class Config:
    def __init__(self):
        self.scale = 2.0
        self.unused = 3
        self._private = 1.0


class Mode(enum.Enum):
    SUM = 1
    MEAN = 2


class Inner(nn.Module):
    shift = 0.5  # a class attribute: the instance may shadow it later

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.mode = Mode.SUM
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # state: the call writes over what it read
        out = x * self.config.scale + self.shift + self.config._private
        return out.sum(-1, keepdim=True) if self.mode is Mode.SUM else out.mean(-1, keepdim=True)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = Config()
        self.inner = Inner(self.config)
        self.eps = 1e-6
        self.kinds = ["a", "b"]
        self.table = torch.ones(3)
        self.register_buffer("offset", torch.zeros(1))

    def forward(self, x):
        self.last = x.sum()  # state: a tensor each call assigns
        return self.inner(x * self.table) + self.eps * self.inner.shift * len(self.kinds) + self.offset + self.last * 0


def recorded_reads(model, *args):
    with recording(model) as reads, torch.no_grad():
        model(*args)
    return reads


def _by_name(reads):
    return {f"{r.path}.{n}" if r.path else n: v for r in reads for n, v in r.values.items()}


def test_a_call_records_the_plain_values_read_on_modules_and_objects_they_hold():
    model = Outer()
    reads = recorded_reads(model, torch.ones(2, 3))
    # the config is named where the call first reached it
    assert _by_name(reads) == {"eps": 1e-6, "kinds": ["a", "b"], "inner.shift": 0.5, "inner.mode": Mode.SUM,
                               "inner.config.scale": 2.0}
    # private names, values never read (config.unused) and the counter the call bumps are not settings
    assert model.inner.calls == 1


def test_plain_tensor_attributes_are_recorded_and_buffers_and_state_are_not():
    model = Outer()
    (outer,) = [r for r in recorded_reads(model, torch.ones(2, 3)) if r.obj is model]
    assert list(outer.tensors) == ["table"] and outer.tensors["table"] is model.table


def test_recording_gives_every_object_its_own_class_back():
    model = Outer()
    classes = [type(m) for m in model.modules()] + [type(model.config)]
    with recording(model):
        assert type(model.inner) is not Inner and isinstance(model.inner, Inner)
        model(torch.ones(1, 3))
        assert type(model.config) is not Config and isinstance(model.config, Config)
    assert [type(m) for m in model.modules()] + [type(model.config)] == classes


def test_a_call_that_fails_restores_the_classes():
    class Failing(Outer):
        def forward(self, x):
            raise RuntimeError("no")

    model = Failing()
    with pytest.raises(RuntimeError, match="no"):
        recorded_reads(model, torch.ones(1, 3))
    assert type(model) is Failing and type(model.inner) is Inner


def test_reads_made_only_by_modules_called_live_are_not_baked():
    """A torch program calls blocks left as written as the modules they are: what only their code read, it reads
    anew at each call. A value the traced code read too stays baked."""
    model = Outer()
    reads = recorded_reads(model, torch.ones(2, 3))
    live = {id(model.inner)}
    kept = _by_name(baked(reads, live))
    assert "inner.mode" not in kept and "inner.config.scale" not in kept
    assert kept["inner.shift"] == 0.5 and kept["eps"] == 1e-6  # the outer forward read inner.shift itself
    assert _by_name(baked(reads, set())).keys() == _by_name(reads).keys()


def test_values_changed_since_the_recording_or_named_as_state_are_not_baked():
    model = Outer()
    reads = recorded_reads(model, torch.ones(2, 3))
    model.eps = 1e-5  # written by some other call of the compile
    kept = _by_name(baked(reads, set(), frozenset({(id(model.inner), "shift")})))
    assert "eps" not in kept and "inner.shift" not in kept and kept["inner.config.scale"] == 2.0


def test_the_watch_names_the_setting_changed_in_place_shadowed_or_deleted():
    from moecc.runtime.weights import WeightWatch

    model = Outer()
    watch = WeightWatch(model, None, reads=recorded_reads(model, torch.ones(2, 3)))
    assert watch.changed() is None
    model.kinds.append("c")
    assert watch.changed() == "kinds"
    model.kinds.pop()
    model.inner.shift = 0.25  # the class attribute, shadowed on the instance
    assert watch.changed() == "inner.shift"
    del model.inner.shift
    model.inner.config.scale = 3.0
    assert watch.changed() == "inner.config.scale"
    model.inner.config.scale = 2.0
    del model.eps
    assert watch.changed() == "eps"


def test_a_recording_inside_another_gives_the_outer_one_its_objects_back():
    """A model compiled inside the call of another being compiled records its own reads, then the outer recording
    goes on."""
    model = Outer()
    with recording(model) as outer:
        inner_reads = recorded_reads(model.inner, torch.ones(1, 3))
        assert type(model.inner) is not Inner
        model(torch.ones(1, 3))
    assert _by_name(inner_reads) == {"shift": 0.5, "mode": Mode.SUM, "config.scale": 2.0}
    assert "inner.shift" in _by_name(outer) and "inner.config.scale" in _by_name(outer)
    assert type(model.inner) is Inner and type(model.config) is Config


def test_a_model_whose_code_dynamo_traces_as_it_runs_is_captured_without_its_reads():
    """``torch.cond`` in eager traces its branches with dynamo, which cannot trace a recording class's
    ``__getattribute__``: the capture's eager call runs again as written, and records nothing."""
    from moecc.capture import capture

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda y: self.lin(y), lambda y: -y, (x,))

    assert capture(Branchy().eval(), (torch.randn(3, 4),), {}).reads == []
    assert _by_name(capture(Outer(), (torch.ones(2, 3),), {}).reads)["eps"] == 1e-6

"""Hostile inputs to the editing core: stale prefix caches, out-of-order reverts, frozen parameters,
inference mode and meta tensors, a write-back failing half way, a finite loss with a non-finite
gradient. Every refusal names the problem and leaves the model bit-identical (state-dict bits,
every module's training flag, every requires_grad)."""
import copy

import pytest
import torch
from helpers import assert_identical, snapshot
from torch import nn

import fastedit as fe
from fastedit._core import clear_split_cache, commit_params
from fastedit.edit import EditResult


def predicted(model, x):
    with torch.no_grad():
        return int(model(x).argmax(-1)[0])


# ------------------------------------------------------------------------------------------------
# 1. a cached split never serves stale tensors
# ------------------------------------------------------------------------------------------------
class Functional(nn.Module):
    """Reads a parameter, a buffer and a plain tensor attribute functionally: a traced split binds
    them (get_attr). The model's fingerprint covers the first two; the split's own check the third."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.zeros(4))
        self.scale = torch.ones(4)  # neither a parameter nor a buffer
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body((x + self.pos - self.mean) * self.scale)))


def _fresh_weights(seed):
    torch.manual_seed(seed)
    new = Functional()
    with torch.no_grad():
        new.pos.add_(3.0)
        new.mean.fill_(-2.0)
    return new.state_dict()


CHANGES = {
    "load_state_dict(assign=True)": lambda m: m.load_state_dict(_fresh_weights(5), assign=True),
    "parameter re-assigned": lambda m: setattr(m, "pos", nn.Parameter(torch.full((4,), 2.5))),
    "buffer re-assigned": lambda m: setattr(m, "mean", torch.full((4,), -4.0)),
    "plain tensor attribute re-assigned": lambda m: setattr(m, "scale", torch.full((4,), 2.0)),
    "to(float64)": lambda m: m.to(torch.float64),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("params", ["pos", "head"])
def test_a_stale_split_is_rebuilt_and_success_agrees_with_the_model(change, params):
    torch.manual_seed(0)
    model = Functional().eval()
    x = torch.randn(1, 4)
    r = fe.edit(model, x, 0, params=params, max_steps=0)  # builds and caches the split
    assert r.prefix_method == "fx"
    CHANGES[change](model)
    x = x.to(next(model.parameters()).dtype)
    for step in range(3):  # several edits: each must see the model as it is now
        target = (predicted(model, x) + 1) % 3
        r = fe.edit(model, x, target, params=params, editor=fe.RMSProp(0.3), max_steps=100)
        assert r.success
        assert predicted(model, x) == target, f"edit {step} reported success on stale tensors"


@pytest.mark.parametrize("change", list(CHANGES))
def test_evaluate_surgery_and_training_see_the_current_model(change):
    torch.manual_seed(0)
    model = Functional().eval()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    fe.evaluate(model, (x, y), (x, y), params="pos", editor=fe.GD(0.3), max_steps=5, progress=False)
    fe.surgery(model, x[:1], 0, budget=2, params="pos", steps=0)
    et = fe.EditableTraining(model, params="pos", editor=fe.GD(0.1), max_steps=2)
    et(x, y, x[:2], torch.tensor([0, 1]))
    CHANGES[change](model)
    x = x.to(next(model.parameters()).dtype)
    twin = copy.deepcopy(model)  # a model no split was ever built for
    clear_split_cache(twin)
    a = fe.evaluate(model, (x, y), (x, y), params="pos", editor=fe.GD(0.3), max_steps=5, progress=False)
    b = fe.evaluate(twin, (x, y), (x, y), params="pos", editor=fe.GD(0.3), max_steps=5, progress=False)
    for k in ("errors", "flips", "steps", "success"):
        assert torch.equal(a.per_edit[k], b.per_edit[k]), k
    s1 = fe.surgery(model, x[:1], (predicted(model, x[:1]) + 1) % 3, budget=4, params="pos", steps=50)
    s2 = fe.surgery(twin, x[:1], (predicted(twin, x[:1]) + 1) % 3, budget=4, params="pos", steps=50)
    assert (s1.success, s1.steps) == (s2.success, s2.steps)
    if s1.success:
        assert predicted(model, x[:1]) == predicted(twin, x[:1])
    torch.manual_seed(3)
    l1, _ = fe.EditableTraining(model, params="pos", editor=fe.GD(0.1), max_steps=2)(x, y, x[:2], torch.tensor([0, 1]))
    torch.manual_seed(3)
    l2, _ = fe.EditableTraining(twin, params="pos", editor=fe.GD(0.1), max_steps=2)(x, y, x[:2], torch.tensor([0, 1]))
    assert l1.item() == l2.item()


# ------------------------------------------------------------------------------------------------
# 2. revert refuses when the parameters no longer hold what the edit wrote
# ------------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()


def _two_edits(model, x, edit=fe.edit, **kw):
    p0 = predicted(model, x)
    r1 = edit(model, x, (p0 + 1) % 3, params="2", editor=fe.GD(1.0), max_steps=50, **kw)
    after1 = snapshot(model)
    r2 = edit(model, x, (p0 + 2) % 3, params="2", editor=fe.GD(1.0), max_steps=50, **kw)
    assert r1.success and r2.success
    return r1, r2, after1


@pytest.mark.parametrize("kind", ["edit", "ewc"])
def test_reverts_in_reverse_order_and_refuses_out_of_order(kind):
    model = _mlp()
    x = torch.randn(1, 4)
    original = snapshot(model)
    if kind == "edit":
        edit, kw = fe.edit, {}
    else:
        edit = fe.baselines.ewc_edit
        kw = dict(fisher={n: torch.ones_like(p) for n, p in model.named_parameters()}, ewc_lambda=1e-3)
    r1, r2, after1 = _two_edits(model, x, edit, **kw)
    after2 = snapshot(model)
    with pytest.raises(ValueError, match="revert the later edits first"):
        r1.revert()
    assert_identical(model, after2)  # the refusal wrote nothing
    assert r1.applied and r2.applied
    r2.revert()
    assert_identical(model, after1)
    r1.revert()
    assert_identical(model, original)
    assert not r1.applied and not r2.applied


def test_revert_refuses_after_an_outside_write_unless_forced():
    model = _mlp()
    x = torch.randn(1, 4)
    original = snapshot(model)
    r = fe.edit(model, x, (predicted(model, x) + 1) % 3, params="2", editor=fe.GD(1.0), max_steps=50)
    with torch.no_grad():
        model[2].bias.add_(0.0)  # an in-place write, even of the same values, is a change
    touched = snapshot(model)
    with pytest.raises(ValueError, match="2.bias"):
        r.revert()
    assert_identical(model, touched)
    r.revert(force=True)
    assert_identical(model, original)


def test_revert_refuses_when_the_parameter_was_replaced():
    model = _mlp()
    x = torch.randn(1, 4)
    r = fe.edit(model, x, (predicted(model, x) + 1) % 3, params="2", editor=fe.GD(1.0), max_steps=50)
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    with pytest.raises(ValueError, match="2.weight"):
        r.revert()


# ------------------------------------------------------------------------------------------------
# 4. frozen parameters are not edited unless asked for
# ------------------------------------------------------------------------------------------------
def test_frozen_parameters_are_skipped_named_ones_raise():
    model = _mlp()
    model[2].bias.requires_grad_(False)
    x = torch.randn(1, 4)
    before = snapshot(model)
    target = (predicted(model, x) + 1) % 3
    r = fe.edit(model, x, target, params="2", editor=fe.GD(1.0), max_steps=50)
    assert r.param_names == ["2.weight"]
    assert torch.equal(model[2].bias, before["2.bias"])
    r.revert()
    for spec in ("2.bias", [model[2].bias], ["2.weight", "2.bias"]):
        with pytest.raises(ValueError, match="include_frozen"):
            fe.edit(model, x, target, params=spec)
        assert_identical(model, before)
    model[2].weight.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="only frozen"):
        fe.edit(model, x, target, params="2")
    with pytest.raises(ValueError, match="only frozen"):
        fe.surgery(model, x, target, budget=3, params="2")
    assert_identical(model, before)
    r = fe.edit(model, x, target, params="2", editor=fe.GD(1.0), max_steps=50, include_frozen=True)
    assert r.success and r.param_names == ["2.weight", "2.bias"]
    assert not model[2].weight.requires_grad  # the flags are the user's: kept
    r.revert()
    assert_identical(model, before)


def test_frozen_parameters_in_evaluate_tune_and_editable_training():
    model = _mlp()
    model[2].bias.requires_grad_(False)
    torch.manual_seed(1)
    x = torch.randn(6, 4)
    with torch.no_grad():
        y = (model(x).argmax(-1) + 1) % 3
    before = snapshot(model)
    rep = fe.evaluate(model, (x[:2], y[:2]), (x, y), editor=fe.GD(1.0), params="2", progress=False)
    assert rep.params == ["2.weight"]
    with pytest.raises(ValueError, match="include_frozen"):
        fe.evaluate(model, (x[:2], y[:2]), (x, y), params="2.bias", progress=False)
    rep = fe.evaluate(model, (x[:2], y[:2]), (x, y), editor=fe.GD(1.0), params="2", progress=False,
                      include_frozen=True)
    assert rep.params == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="include_frozen"):
        fe.tune(model, (x[:2], y[:2]), (x, y), editor="gd", params=["2.bias"], grid={"lr": [0.1]},
                progress=False)
    assert fe.tune(model, (x[:2], y[:2]), (x, y), editor="gd", params="2", grid={"lr": [0.1]},
                   progress=False, include_frozen=True).report.params == ["2.weight", "2.bias"]
    assert_identical(model, before)
    assert fe.EditableTraining(model, params="2").param_names == ["2.weight"]
    with pytest.raises(ValueError, match="include_frozen"):
        fe.EditableTraining(model, params=["2.bias"])
    et = fe.EditableTraining(model, params="2", include_frozen=True, editor=fe.GD(0.1), max_steps=2)
    assert et.param_names == ["2.weight", "2.bias"]
    loss, _ = et(x, y)
    loss.backward()
    assert model[2].bias.grad is None  # frozen: the outer optimiser does not train it
    assert model[2].weight.grad is not None


# ------------------------------------------------------------------------------------------------
# 8. inference mode and meta tensors: say what is wrong and what to do
# ------------------------------------------------------------------------------------------------
def test_inference_mode_and_inference_tensors_are_refused_clearly():
    model = _mlp()
    x = torch.randn(1, 4)
    before = snapshot(model)
    with torch.inference_mode():
        with pytest.raises(fe.EditError, match="outside the `with torch.inference_mode"):
            fe.edit(model, x, 1, params="2")
    assert_identical(model, before)
    with torch.inference_mode():
        frozen_model = _mlp()
    with pytest.raises(fe.EditError, match="created under torch.inference_mode"):
        fe.edit(frozen_model, x, 1, params="2")
    fresh = _mlp()  # the advice in the message works
    fresh.load_state_dict(frozen_model.state_dict())
    assert fe.edit(fresh, x, (predicted(fresh, x) + 1) % 3, params="2", editor=fe.GD(1.0), max_steps=50).success


def test_meta_parameters_are_refused_clearly():
    with torch.device("meta"):
        model = _mlp()
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        fe.edit(model, torch.randn(1, 4, device="meta"), 1, params="2")


# ------------------------------------------------------------------------------------------------
# 16. a write-back failing half way restores everything
# ------------------------------------------------------------------------------------------------
def test_a_failing_write_back_restores_the_parameters_already_written():
    model = _mlp()
    before = snapshot(model)
    params = [model[2].weight, model[2].bias, model[0].weight]
    new = [torch.randn_like(params[0]), torch.randn(7), torch.randn_like(params[2])]  # the second one does not fit
    result = EditResult(success=True, steps=1, loss=0.0, initial_loss=1.0, applied=False, param_names=[])
    with pytest.raises(RuntimeError):
        commit_params(result, params, new, model)
    assert_identical(model, before)
    assert not result.applied


# ------------------------------------------------------------------------------------------------
# 17. a finite loss with a non-finite gradient
# ------------------------------------------------------------------------------------------------
class SqrtAtZero(nn.Module):
    """logits = [x·w + 1 + sqrt(|θ|) − 1, x·w']: at θ = 0 the loss is finite, its gradient is not."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2))
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) + torch.sqrt(self.theta.abs())


def test_a_non_finite_gradient_with_a_finite_loss_is_caught():
    torch.manual_seed(0)
    model = SqrtAtZero().double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    before = snapshot(model)
    target = (predicted(model, x[:1]) + 1) % 2
    with pytest.raises(fe.EditError, match="non-finite"):
        fe.edit(model, x[:1], target, params="theta", editor=fe.GD(0.1))
    assert_identical(model, before)
    y = (model(x).argmax(-1) + 1) % 2
    for strategy in ("loop", "vmap"):
        rep = fe.evaluate(model, (x, y.detach()), (x, y.detach()), params="theta", editor=fe.GD(0.1), max_steps=3,
                          strategy=strategy, edits_per_group=4, progress=False)
        assert rep.per_edit["nonfinite"].all() and not rep.per_edit["success"].any(), strategy
        assert (rep.per_edit["steps"] == 0).all()
    assert_identical(model, before)


# ------------------------------------------------------------------------------------------------
# 3. (surgery's part) a delta of a tied weight names all its aliases
# ------------------------------------------------------------------------------------------------
def test_a_surgery_delta_of_a_tied_weight_patches_an_untied_copy_too():
    import transformers as tf
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())  # two tensors, same values
    ids = torch.randint(0, 50, (1, 5))
    labels = torch.full_like(ids, -100)
    labels[0, -1] = 7
    r = fe.surgery(model, {"input_ids": ids}, fe.TokenTargets(labels, causal=True), budget=20, params="lm_head",
                   steps=50)
    assert r.success and r.delta.names == ["transformer.wte.weight"]
    assert r.delta.aliases == {"transformer.wte.weight": ("lm_head.weight",)}
    r.delta.apply(untied)
    assert torch.equal(untied.lm_head.weight, model.lm_head.weight)
    assert torch.equal(untied.transformer.wte.weight, model.transformer.wte.weight)

"""EditableTraining under DistributedDataParallel: two CPU processes (gloo) on this machine.

Each rank builds the same model (same seed), wraps ``EditableTraining`` in
``DistributedDataParallel`` (without ``find_unused_parameters``), takes three optimizer steps on its
half of a fixed global batch with the SAME explicit edit on both ranks, and saves its final
``state_dict``. The parent test checks

(a) both ranks hold bit-identical parameters (model and learned editor), and
(b) for a model without BatchNorm (a float64 MLP, with and without rematerialised inner steps),
    they equal a single-process run of the same three steps on the concatenated global batch with
    the same edits (rtol = atol = 1e-10; measured: ~4e-16 relative).

Why one shared edit makes (b) an identity. DDP averages the two ranks' gradients, i.e. it
differentiates ``(Obj_0 + Obj_1) / 2``, where rank r computes, on its half B_r of the batch,

    Obj_r = L_base(B_r) + c_edit · L_edit + c_loc · L_loc(B_r).

``L_base`` and ``L_loc`` are means over the batch (``L_loc``: per edit, the batch mean of the KL
between the model before and after *that* edit), and both halves have the same size, so the average
of the halves' means is the mean over the whole batch — provided the edit, hence the edited
parameters, is the same on both ranks. ``L_edit`` depends only on the parameters and the edit, so it
is identical on both ranks. Hence ``(Obj_0 + Obj_1) / 2 = Obj(B_0 ∪ B_1)`` as functions of θ and
of the editor's hyper-parameters, and so are their gradients. (With edits sampled per rank the
average would be a different, equally valid, objective — not comparable to one process.)

Why no BatchNorm in (b). In train mode BatchNorm normalises with the statistics of the batch it
sees: each rank normalises its half with the half's mean and variance, which differ from the full
batch's, so ``L_base`` on a half is not half of anything computed on the full batch (and each rank
also updates its running statistics, used by the eval-mode edit, with its own half). The average of
the two ranks' objectives is then not the single-process objective, and no tolerance makes (b) hold.
The BatchNorm model (``SmallCNN``) is run for (a) only: gradients are all-reduced, so parameters stay
identical on both ranks whatever each rank computed. Its *buffers* (running statistics) are not
compared: DDP broadcasts rank 0's buffers at the start of each forward, after which each rank updates
them with its own half.

No ``find_unused_parameters``: ``EditableTraining`` makes every learnable hyper-parameter part of the
graph even when an edit takes no step. One of the three steps uses an edit that is already satisfied
(target = the current prediction, 0 inner steps, so the step size is never used): without that
guarantee DDP would raise at the next forward ("Expected to have finished reduction ..."). The test
also checks that every parameter has a gradient after each backward.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import socket

import pytest
import torch
import torch.distributed as dist

import fastedit as fe
from fastedit.models import MLP, SmallCNN

WORLD = 2
STEPS = 3
GLOBAL_BATCH = 16
SATISFIED_STEP = 1  # the step whose edit targets the current prediction (0 inner steps)

pytestmark = [pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this build of torch",
), pytest.mark.slow]  # each configuration spawns two processes

# name -> input shape, editable parameters, dtype, rematerialised inner steps or not
CONFIGS = {
    "mlp": dict(in_shape=(12,), params="features.2", dtype=torch.float64, rematerialize=False),
    # the same with rematerialised inner steps: DDP's gradient hooks fire from _RematStep.backward
    "mlp_remat": dict(in_shape=(12,), params="features.2", dtype=torch.float64, rematerialize=True),
    "bn_cnn": dict(in_shape=(1, 8, 8), params=["features.3.weight", "features.4.weight", "features.4.bias"],
                   dtype=torch.float64, rematerialize=False),
}
NO_BATCHNORM = ["mlp", "mlp_remat"]


def _build(name: str) -> fe.EditableTraining:
    cfg = CONFIGS[name]
    torch.manual_seed(1234)
    if name.startswith("mlp"):
        # editable: the second hidden layer, so the suffix is nonlinear (ReLU, classifier). With the
        # last Linear alone the constraint's gradient would not depend on θ (while the argmax holds),
        # every RMSProp step would see the same g, and β would get an exactly zero gradient.
        model = MLP(in_features=12, hidden=(16, 16), num_classes=10)
    else:
        # editable: the second conv and its BatchNorm, so the suffix holds a BatchNorm (train-mode
        # L_base and L_loc, eval-mode edit) and the prefix another one
        model = SmallCNN(in_channels=1, num_classes=10, width=4)
    model = model.to(cfg["dtype"]).train()
    return fe.EditableTraining(model, params=cfg["params"], editor=fe.RMSProp(0.05, beta=0.5), max_steps=5,
                               c_edit=1.0, c_loc=1.0, learn=("lr", "beta"), rematerialize=cfg["rematerialize"])


def _data(name: str):
    """The fixed global batches and the (unsatisfied) edits, identical in every process."""
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(STEPS, GLOBAL_BATCH, *cfg["in_shape"], generator=gen, dtype=cfg["dtype"])
    y = torch.randint(0, 10, (STEPS, GLOBAL_BATCH), generator=gen)
    edit_x = torch.randn(STEPS, 1, *cfg["in_shape"], generator=gen, dtype=cfg["dtype"])
    return x, y, edit_x


def _edit_target(et: fe.EditableTraining, edit_x: torch.Tensor, step: int, satisfied: bool) -> torch.Tensor:
    """The edit's target: the current eval-mode prediction (already satisfied) or another class."""
    model = et.model
    was = model.training
    model.eval()
    with torch.no_grad():
        pred = model(edit_x).argmax(-1)
    model.train(was)
    return pred if satisfied else (pred + 3 + step) % 10


def _optimizer(et: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(et.parameters(), lr=0.1, momentum=0.9)


def _missing_grads(et: fe.EditableTraining) -> list[str]:
    return [n for n, p in et.named_parameters() if p.grad is None]


def _worker(rank: int, port: int, names: list[str], out_dir: str) -> None:
    """One DDP rank: for each config, three steps on this rank's half, then save the state."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a short timeout: a rank left waiting in a collective fails instead of hanging for 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        for name in names:
            et = _build(name)
            ddp = torch.nn.parallel.DistributedDataParallel(et)  # no find_unused_parameters
            opt = _optimizer(ddp)
            x, y, edit_x = _data(name)
            half = GLOBAL_BATCH // WORLD
            rows = slice(rank * half, (rank + 1) * half)
            steps, missing = [], []
            for step in range(STEPS):
                edit_y = _edit_target(et, edit_x[step], step, satisfied=step == SATISFIED_STEP)
                dist.broadcast(edit_y, src=0)  # the same edit on both ranks (BN: eval stats may differ)
                opt.zero_grad(set_to_none=True)
                loss, stats = ddp(x[step, rows], y[step, rows], edit_x=edit_x[step], edit_y=edit_y)
                loss.backward()
                missing.append(_missing_grads(et))
                opt.step()
                steps.append(float(stats["edit_steps"]))
            torch.save({"state": {k: v.detach().clone() for k, v in et.state_dict().items()},
                        "params": [n for n, _ in et.named_parameters()], "edit_steps": steps,
                        "missing_grads": missing},
                       pathlib.Path(out_dir) / f"{name}_rank{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _single_process(name: str) -> dict:
    """The same three steps in one process, on the concatenated global batch."""
    et = _build(name)
    opt = _optimizer(et)
    x, y, edit_x = _data(name)
    steps = []
    for step in range(STEPS):
        edit_y = _edit_target(et, edit_x[step], step, satisfied=step == SATISFIED_STEP)
        opt.zero_grad(set_to_none=True)
        loss, stats = et(x[step], y[step], edit_x=edit_x[step], edit_y=edit_y)
        loss.backward()
        assert not _missing_grads(et)
        opt.step()
        steps.append(float(stats["edit_steps"]))
    return {"state": et.state_dict(), "edit_steps": steps}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict:
    """Run both configs in one pair of spawned processes (one start-up, ~seconds) and load results."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("ddp")
    names = list(CONFIGS)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned children: 2 ranks on 2 cores
    try:
        mp.spawn(_worker, args=(_free_port(), names, str(out_dir)), nprocs=WORLD, join=True)
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return {(name, r): torch.load(out_dir / f"{name}_rank{r}.pt", weights_only=True)
            for name in names for r in range(WORLD)}


def _param_state(result: dict) -> dict:
    return {n: result["state"][n] for n in result["params"]}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_hold_identical_parameters(ddp_results, name):
    r0, r1 = ddp_results[(name, 0)], ddp_results[(name, 1)]
    assert r0["params"] == r1["params"]
    assert any(n.startswith("learned_editor.") for n in r0["params"])
    for n in r0["params"]:
        assert torch.equal(r0["state"][n], r1["state"][n]), f"{name}: {n} differs between ranks"
    # every parameter, learned hyper-parameters included, had a gradient after every backward
    assert r0["missing_grads"] == r1["missing_grads"] == [[]] * STEPS


@pytest.mark.parametrize("name", NO_BATCHNORM)
def test_ddp_matches_single_process_without_batchnorm(ddp_results, name):
    ref = _single_process(name)
    r0 = ddp_results[(name, 0)]
    # the schedule exercised both paths: edits that took steps, and an already satisfied edit
    assert r0["edit_steps"] == ref["edit_steps"]
    assert r0["edit_steps"][SATISFIED_STEP] == 0
    assert all(s > 0 for i, s in enumerate(r0["edit_steps"]) if i != SATISFIED_STEP)
    start = _build(name).state_dict()
    for n, v in _param_state(r0).items():
        assert not torch.equal(v, start[n]), f"{n} did not move: the comparison would be vacuous"
        torch.testing.assert_close(v, ref["state"][n], rtol=1e-10, atol=1e-10, msg=lambda m: f"{n}: {m}")

"""fastedit.evaluate and fastedit.tune under torch.distributed: two CPU processes (gloo) shard the
edits and every rank returns the report a single process computes (bit for bit, except timings).

The edit count (7) does not divide by the world size, so the ranks get blocks of 3 and 4 edits."""
from __future__ import annotations

import datetime
import os
import pathlib
import socket

import pytest
import torch
import torch.distributed as dist
from helpers import make_model

import fastedit as fe

pytestmark = pytest.mark.slow  # spawns two processes

WORLD = 2
GRID = {"lr": [0.01, 0.3]}


def _data():
    g = torch.Generator().manual_seed(11)
    x_e, y_e = torch.randn(7, 1, 8, 8, generator=g), torch.randint(0, 10, (7,), generator=g)
    x_c, y_c = torch.randn(29, 1, 8, 8, generator=g), torch.randint(0, 10, (29,), generator=g)
    return (x_e, y_e), (x_c, y_c)


def _run():
    model = make_model()
    edits, control = _data()
    report = fe.evaluate(model, edits, control, editor=fe.RMSProp(0.01), params="block", max_steps=5,
                         progress=False, keep_kl_vectors=True)
    tuned = fe.tune(model, edits, control, editor="gd", params="block", max_steps=5, grid=GRID, progress=False,
                    min_success=0.5)
    return {"report": report, "tuned_editor": tuned.editor.to_dict(),
            "tune_table": [{k: v for k, v in row.items() if k != "seconds"} for row in tuned.table]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_run(), pathlib.Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp
    out_dir = tmp_path_factory.mktemp("eval_dist")
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _summary(report):
    d = report.to_dict(per_edit=True)
    d.pop("seconds")
    return d


@pytest.fixture(scope="module")
def single():
    """The same run in this process, with the ranks' thread count (oneDNN convolutions may round
    differently with another thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run()
    finally:
        torch.set_num_threads(threads)


def test_every_rank_returns_the_single_process_report(ranks, single):
    for r, result in enumerate(ranks):
        rep = result["report"]
        assert rep.world_size == WORLD and rep.num_edits == 7
        assert _summary(rep) == {**_summary(single["report"]), "world_size": WORLD}, f"rank {r}"
        for k, v in single["report"].per_edit.items():
            assert torch.equal(rep.per_edit[k], v), (r, k)


def test_tune_is_sharded_and_agrees(ranks, single):
    for result in ranks:
        assert result["tuned_editor"] == single["tuned_editor"]
        assert result["tune_table"] == single["tune_table"]

"""NA-LoRA under data parallelism (what `accelerate launch` does): two CPU ranks (gloo) see different
batches; the controller sums its statistics over ranks, so masks, step scales and weights stay equal."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _worker(rank: int, world: int, init_file: str, out_dir: str, reduce: bool) -> None:
    import tiny_models as tm
    import torch.distributed as dist

    from nalora import inject
    from nalora.controller import NALoRAController

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if not reduce:  # the failure this test guards against: each rank decides alone
            NALoRAController._all_reduce_statistics = lambda self: None
        torch.manual_seed(0)  # same base model and adapter init on every rank
        ad = inject(tm.llama(), "nalora", targets=("gate",), towers=("language",), rank=4,
                    method_options={"mask_interval": 2, "warmup_frac": 0.0, "final_frac": 0.5, "rho_final": 0.5})
        model = torch.nn.parallel.DistributedDataParallel(ad.model)
        opt = ad.make_optimizer(5e-2, total_steps=8)
        g = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
        for _ in range(8):
            ids = torch.randint(3, tm.VOCAB, (2, 6), generator=g)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        keep = [u.keep.clone() for u in ad.controller.units]
        params = {n: p.detach().clone() for n, p in ad.model.named_parameters() if p.requires_grad}
        torch.save({"keep": keep, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, reduce: bool) -> tuple[dict, dict]:
    out = tmp_path / ("reduce" if reduce else "alone")
    out.mkdir()
    mp.spawn(_worker, args=(2, str(out / "init"), str(out), reduce), nprocs=2, join=True)
    return tuple(torch.load(out / f"rank{r}.pt") for r in range(2))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_ranks_agree_on_mask_and_weights(tmp_path):
    a, b = _run(tmp_path, reduce=True)
    assert all(torch.equal(x, y) for x, y in zip(a["keep"], b["keep"]))
    assert not all(bool(k.all()) for k in a["keep"])  # the mask really is active
    for n in a["params"]:
        torch.testing.assert_close(a["params"][n], b["params"][n], rtol=0, atol=1e-6)
    # Without the cross-rank sum, the ranks' masks (and so their weights) part ways: the check above can fail.
    a, b = _run(tmp_path, reduce=False)
    assert not all(torch.equal(x, y) for x, y in zip(a["keep"], b["keep"]))

"""DDP on 2 CPU processes (gloo): gradients are synchronized.

Each rank sees different data; after one optimizer step the parameters are identical on both
ranks and equal to a single-process step on the concatenated batch (mean loss, equal shards).
The model is factorized first, then wrapped, then the optimizer is built.
"""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from convfactor.compression.api import compress
from convfactor.train import ddp


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    example = torch.randn(1, 3, 8, 8)
    compressed, _ = compress(net, [{"op_types": ["Conv2d"], "method": "channel_svd", "rank": 3}], example)
    return compressed


def _data(world: int):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(4 * world, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (4 * world,), generator=g)
    return x, y


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ddp.init(rank, world, port, backend="gloo")
    try:
        model = _model()                          # 1. factorize
        wrapped = ddp.wrap(model)                 # 2. wrap
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)   # 3. optimizer
        x, y = _data(world)
        xs, ys = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]   # different data per rank
        loss = nn.functional.cross_entropy(wrapped(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"step{rank}.pt"))

        # The library loop under DDP: per-rank batches, rank-0 checkpoints, identical weights after.
        from convfactor.train.finetune import CheckpointConfig, FinetuneConfig, OptimizerConfig, finetune
        data = torch.utils.data.TensorDataset(*_data(world))
        cfg = FinetuneConfig(steps=3, batch_size=4, optimizer=OptimizerConfig("sgd", lr=0.1), loss="ce",
                             progress=False, checkpoint=CheckpointConfig(os.path.join(out_dir, "ckpt"), every=2))
        tuned = finetune(_model(), data, cfg)
        assert not isinstance(tuned, nn.parallel.DistributedDataParallel)
        torch.save(tuned.state_dict(), os.path.join(out_dir, f"ft{rank}.pt"))
    finally:
        ddp.cleanup()


def test_gradients_are_synchronized_across_two_gloo_processes():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    world = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, ddp.free_port(), out_dir), nprocs=world, join=True)
        s0, s1 = (torch.load(os.path.join(out_dir, f"step{r}.pt"), weights_only=True) for r in range(world))
        f0, f1 = (torch.load(os.path.join(out_dir, f"ft{r}.pt"), weights_only=True) for r in range(world))
        assert os.path.isfile(os.path.join(out_dir, "ckpt", "latest.json"))

    # Single process, whole batch.
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = _data(world)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
        torch.testing.assert_close(s0[k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    for k in f0:
        assert torch.equal(f0[k], f1[k]), f"{k} differs between ranks after finetune()"

"""DDP and FSDP2 on gloo (2 CPU processes): same gradients as one process, distinct masks per rank."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from lora_fused import LoRALinear, LoRAQKV, load_lora, lora_state_dict, save_lora

WORLD = 2


class _Net(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.qkv = LoRAQKV(12, 36, r=4, lora_dropout=p, targets="qv")
        self.head = LoRALinear(36, 5, r=2, lora_dropout=p)
        with torch.no_grad():
            for m in (self.qkv, self.head):
                m.lora_B.normal_(std=0.1)

    def forward(self, x):
        return self.head(torch.relu(self.qkv(x)))


def _data():
    g = torch.Generator().manual_seed(99)
    return torch.randn(8, 12, generator=g), torch.randn(8, 5, generator=g)


def _adapter_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, init_file, out_dir, mode):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        x, target = _data()
        shard = slice(rank * 4, (rank + 1) * 4)
        result = {}
        if mode == "ddp":
            net = nn.parallel.DistributedDataParallel(_Net(p=0.0))
            nn.functional.mse_loss(net(x[shard]), target[shard]).backward()
            result["grads"] = _adapter_grads(net.module)
            drop = nn.parallel.DistributedDataParallel(_Net(p=0.5)).train()
            outs = []
            for _ in range(2):  # the same seed twice: reproducible on each rank
                torch.manual_seed(7)
                outs.append(drop(x).detach())
            result["dropout_outputs"] = outs
        else:
            from torch.distributed.fsdp import fully_shard

            net = _Net(p=0.0)
            for m in (net.qkv, net.head):
                fully_shard(m)
            fully_shard(net)
            opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
            losses = []
            for _ in range(3):
                loss = nn.functional.mse_loss(net(x[shard]), target[shard])
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            result["losses"] = losses
            result["full"] = {n: p.full_tensor().detach() for n, p in net.named_parameters() if p.requires_grad}
            result["lora_sd"] = lora_state_dict(net)
            save_lora(net, os.path.join(out_dir, "fsdp.safetensors"))  # every rank calls it; rank 0 writes
            result["frozen_sharded"] = not net.qkv.weight.requires_grad and hasattr(net.qkv.weight, "full_tensor")
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, mode):
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path), mode), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="torch.distributed/gloo unavailable")


def test_ddp_grads_equal_single_process_and_ranks_draw_distinct_masks(tmp_path):
    results = _spawn(tmp_path, "ddp")
    torch.manual_seed(0)
    x, target = _data()
    single = _Net(p=0.0)
    nn.functional.mse_loss(single(x), target).backward()
    expected = _adapter_grads(single)
    for res in results:
        assert res["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(res["grads"][name], grad, msg=name)
    r0, r1 = (res["dropout_outputs"] for res in results)
    torch.testing.assert_close(r0[0], r0[1], rtol=0, atol=0)  # reproducible from torch.manual_seed
    torch.testing.assert_close(r1[0], r1[1], rtol=0, atol=0)
    assert not torch.equal(r0[0], r1[0])  # same seed, same input, different ranks: different masks


def test_fsdp2_shards_and_trains(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    results = _spawn(tmp_path, "fsdp")
    torch.manual_seed(0)
    x, target = _data()
    single = _Net(p=0.0)
    opt = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(3):
        loss = nn.functional.mse_loss(single(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    mean_losses = [sum(res["losses"][i] for res in results) / WORLD for i in range(3)]
    assert mean_losses == pytest.approx(losses, rel=1e-5)
    assert mean_losses[-1] < mean_losses[0]
    for name, p in single.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(results[0]["full"][name], p.detach(), msg=name)
    assert results[0]["frozen_sharded"]
    expected_sd = lora_state_dict(single)
    for res in results:  # every rank gathers the full adapters
        assert res["lora_sd"].keys() == expected_sd.keys()
        for key, value in expected_sd.items():
            assert not hasattr(res["lora_sd"][key], "full_tensor")
            torch.testing.assert_close(res["lora_sd"][key], value, msg=key)
    fresh = _Net(p=0.0)
    load_lora(fresh, tmp_path / "fsdp.safetensors")
    for key, value in lora_state_dict(fresh).items():
        torch.testing.assert_close(value, expected_sd[key], msg=key)

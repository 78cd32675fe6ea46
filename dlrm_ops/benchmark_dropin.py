"""The drop-in path on a user's own model: a facebookresearch/dlrm-style DLRM
(one nn.EmbeddingBag(sparse=True) per table in a ModuleList, called in a
Python loop; bmm + tril-gather interaction; torch.optim.SGD over every
parameter) trained stock, converted (``dlrm_ops.convert``), and converted with
the optimizer in the backward and ``dot_interaction`` swapped in: the three
lines of ``accelerate`` below. Time per train step, from the forward to the
end of the optimizer step, on fresh batches in turn."""

import copy
import time
from typing import Dict, List

import torch
from torch import nn

CONFIGS = {
    # name: (tables, D, bottom MLP, top MLP, batch, lookups per bag)
    "kaggle": ([100_000] * 26, 16, [13, 512, 256, 64, 16], [512, 256, 1], 2048, 1),
    "multi-hot": (
        [300_000, 200_000, 100_000, 50_000, 300_000, 10_000, 100_000, 20_000],
        64,
        [13, 512, 256, 64],
        [512, 256, 1],
        512,
        20,
    ),
}


def mlp(sizes: List[int], sigmoid_last: bool = False) -> nn.Sequential:
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        layers.append(nn.ReLU() if i < len(sizes) - 2 or not sigmoid_last else nn.Identity())
    return nn.Sequential(*layers)


class UserDLRM(nn.Module):
    """The structure of facebookresearch/dlrm's DLRM_Net (dot interaction)."""

    def __init__(self, tables, D, bottom, top):
        super().__init__()
        self.emb_l = nn.ModuleList([nn.EmbeddingBag(n, D, mode="sum", sparse=True) for n in tables])
        self.bot_l = mlp(bottom)
        F = len(tables) + 1
        self.top_l = mlp([D + F * (F - 1) // 2] + top, sigmoid_last=True)
        ni = F
        self.li = torch.tensor([i for i in range(ni) for j in range(i)])
        self.lj = torch.tensor([j for i in range(ni) for j in range(i)])

    def apply_emb(self, offsets, indices):
        return [e(indices[k], offsets[k]) for k, e in enumerate(self.emb_l)]

    def interact_features(self, x, ly):
        B, d = x.shape
        T = torch.cat([x] + ly, dim=1).view((B, -1, d))
        Z = torch.bmm(T, torch.transpose(T, 1, 2))
        return torch.cat([x, Z[:, self.li, self.lj]], dim=1)

    def forward(self, dense, offsets, indices):
        x = self.bot_l(dense)
        ly = self.apply_emb(offsets, indices)
        return self.top_l(self.interact_features(x, ly)).squeeze(1)


def accelerate(model: UserDLRM, optimizer: torch.optim.Optimizer):
    """What a user writes: three lines (the first converts the model too)."""
    import dlrm_ops

    dlrm_ops.apply_optimizer_in_backward(optimizer, model)
    model.apply_emb = lambda lS_o, lS_i, *_: model.emb_l(lS_o, lS_i)
    model.interact_features = lambda x, ly: dlrm_ops.dot_interaction(x, ly)


def batches(tables, B, L, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = [(torch.rand(B * L, generator=g) ** 3 * t).long() for t in tables]  # skewed
        off = [torch.arange(0, B * L, L) for _ in tables]
        dense = torch.rand(B, 13, generator=g)
        y = (torch.rand(B, generator=g) < 0.25).float()
        out.append((dense, off, idx, y))
    return out


def _flat(offsets, indices):
    """Per-table offsets (B, no end) and indices as one table-major batch."""
    cache = _flat.__dict__.setdefault("cache", {})
    key = id(indices[0])
    if key not in cache:
        flat = torch.cat(indices)
        starts = torch.tensor([0] + [len(i) for i in indices]).cumsum(0)
        off = torch.cat([o + s for o, s in zip(offsets, starts[:-1])] + [starts[-1:]])
        cache[key] = (flat, off)
    return cache[key]


def train_step(model, opt):
    loss_fn = nn.BCEWithLogitsLoss()
    table_major = not isinstance(model, UserDLRM)  # models.DLRM: one flat batch

    def step(b):
        dense, off, idx, y = b
        opt.zero_grad()
        if table_major:
            out = model(dense, *_flat(off, idx))
        else:
            out = model(dense, off, idx)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        return loss

    return step


def contenders(config: str, lr: float = 0.01) -> Dict[str, callable]:
    tables, D, bottom, top, B, L = CONFIGS[config]
    torch.manual_seed(0)
    stock = UserDLRM(tables, D, bottom, top)
    out = {"stock": (stock, torch.optim.SGD(stock.parameters(), lr=lr))}
    converted = copy.deepcopy(stock)
    import dlrm_ops

    dlrm_ops.convert(converted)
    out["converted"] = (converted, torch.optim.SGD(converted.parameters(), lr=lr))
    per_table = copy.deepcopy(stock)  # the in-backward update, the user's loop kept
    opt_pt = torch.optim.SGD(per_table.parameters(), lr=lr)
    dlrm_ops.apply_optimizer_in_backward(opt_pt, per_table)
    out["+ optimizer in backward, per-table calls"] = (per_table, opt_pt)
    fused = copy.deepcopy(stock)
    opt = torch.optim.SGD(fused.parameters(), lr=lr)
    accelerate(fused, opt)
    out["+ optimizer in backward, one lookup call, dot_interaction"] = (fused, opt)
    from .models import DLRM

    torch.manual_seed(0)
    ours = DLRM(tables, D, bottom, top, embedding_optimizer="sgd", embedding_lr=lr)
    out["dlrm_ops models.DLRM"] = (ours, torch.optim.SGD(ours.dense_parameters(), lr=lr))
    return out


def run(configs: List[str], threads: List[int], steps: int = 8, rounds: int = 5) -> List[dict]:
    results = []
    for config in configs:
        tables, D, bottom, top, B, L = CONFIGS[config]
        data = batches(tables, B, L, steps)
        sides = {k: train_step(m, o) for k, (m, o) in contenders(config).items()}
        for th in threads:
            torch.set_num_threads(th)
            for fn in sides.values():  # warm-up
                for b in data[:2]:
                    fn(b)
            best = {k: float("inf") for k in sides}
            for _ in range(rounds):  # interleaved rounds: drifting load hits all alike
                for k, fn in sides.items():
                    t0 = time.perf_counter()
                    for b in data:
                        fn(b)
                    best[k] = min(best[k], (time.perf_counter() - t0) / len(data))
            for k, t in best.items():
                results.append(
                    dict(config=config, threads=th, impl=k, ms=t * 1e3, speedup=best["stock"] / t)
                )
    return results


def print_table(results: List[dict]) -> None:
    print(f"{'config':<10} {'thr':>3}  {'model':<52} {'ms/step':>9} {'x stock':>8}")
    for r in results:
        print(
            f"{r['config']:<10} {r['threads']:>3}  {r['impl']:<52} {r['ms']:>9.2f} "
            f"{r['speedup']:>7.2f}x"
        )

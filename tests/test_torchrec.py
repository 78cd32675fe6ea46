"""torchrec's KeyedJaggedTensor straight into EmbeddingBagCollection: features
mapped to tables by name, several features sharing a table. Skipped where
torchrec is not installed."""

import pytest
import torch

from dlrm_ops.nn import EmbeddingBagCollection

jagged = pytest.importorskip("torchrec.sparse.jagged_tensor")

TABLES, NAMES = [30, 20], [["user", "item"], ["ad"]]  # "user" and "item" share table 0


def kjt(B=4, weighted=False, lengths_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = ["ad", "item", "user"]  # another order than the tables'
    rows = {"ad": 20, "item": 30, "user": 30}
    lengths = torch.randint(0, 4, (len(keys) * B,), generator=g)
    values = torch.cat(
        [
            torch.randint(0, rows[k], (int(n),), generator=g)
            for k, n in zip(keys, lengths.view(3, B).sum(1))
        ]
    )
    w = torch.rand(values.numel(), generator=g) if weighted else None
    return jagged.KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=values, lengths=lengths.to(lengths_dtype), weights=w
    )


def reference(ebc, features, name):
    """One feature's pooled lookup with torch, from its table."""
    t = next(t for t, names in enumerate(NAMES) if name in names)
    jt = features[name]
    w = jt.weights_or_none()
    return torch.nn.functional.embedding_bag(
        jt.values(),
        ebc.weight_of(t),
        jt.offsets()[:-1].long(),
        mode="sum",
        per_sample_weights=w,
    )


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("lengths_dtype", [torch.int64, torch.int32])
def test_forward_matches_torch_per_feature(weighted, lengths_dtype):
    ebc = EmbeddingBagCollection(TABLES, 8, feature_names=NAMES)
    features = kjt(weighted=weighted, lengths_dtype=lengths_dtype)
    out = ebc(features)
    assert out.shape == (4, 3 * 8)
    for i, name in enumerate(["user", "item", "ad"]):  # the collection's feature order
        torch.testing.assert_close(out[:, 8 * i : 8 * i + 8], reference(ebc, features, name))
    keyed = ebc(features, keyed=True)
    assert keyed.keys() == ["user", "item", "ad"]
    torch.testing.assert_close(keyed["item"], reference(ebc, features, "item"))


def test_shared_table_trains_with_the_fused_optimizer():
    """Both features' gradients reach their shared table in one update."""
    torch.manual_seed(0)
    fused = EmbeddingBagCollection(TABLES, 8, feature_names=NAMES, optimizer="adagrad", lr=0.1)
    plain = EmbeddingBagCollection(TABLES, 8, feature_names=NAMES, sparse=True)
    plain.load_state_dict({"weight": fused.weight.detach().clone()})
    opt = torch.optim.Adagrad(plain.parameters(), lr=0.1, eps=1e-10)
    for step in range(3):
        features = kjt(seed=step)
        grad = torch.randn(4, 24, generator=torch.Generator().manual_seed(step))
        fused(features).backward(grad)
        opt.zero_grad()
        plain(features).backward(grad)
        opt.step()
    torch.testing.assert_close(fused.weight, plain.weight, atol=1e-6, rtol=1e-5)


def test_bad_feature_maps():
    with pytest.raises(ValueError, match="feature_names has a feature twice"):
        EmbeddingBagCollection(TABLES, 8, feature_names=[["a", "b"], ["a"]])
    with pytest.raises(ValueError, match="at least one feature for each of 2 tables"):
        EmbeddingBagCollection(TABLES, 8, feature_names=[["a"]])
    ebc = EmbeddingBagCollection(TABLES, 8, feature_names=[["user"], ["other"]])
    with pytest.raises(ValueError, match=r"lacks features \['other'\]"):
        ebc(kjt())
    with pytest.raises(ValueError, match="needs the collection's feature_names"):
        EmbeddingBagCollection(TABLES, 8)(kjt())

"""Dense models, losses and metrics: shapes, gradients, mixed dims, learning a planted signal, and every
vectorised metric against a slow, plainly correct reference."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from models.dlrm import DLRM, DeepFM, DeepFMConfig, DLRMConfig
from models.errors import ModelConfigError
from models.factory import build_model
from models.losses import bce, bpr, cross_entropy, example_losses, loss_for_task, mse
from models.metrics import TaskMetricsAccumulator, accuracy, auc, log_loss, ndcg_at_k, recall_at_k, task_metrics
from models.metrics import mse as mse_metric
from models.mf import NCF, MatrixFactorization, MFConfig, NCFConfig

MIXED_UI = {"user": 32, "item": 16}
MIXED_FIELDS = {"user": 32, "item": 16, "f0": 8, "f1": 4}
NUM_DENSE = 3
ALL_MODELS = ("mf", "ncf", "dlrm", "deepfm")


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(
    dims: dict[str, int], batch: int, num_dense: int, *, requires_grad: bool = False, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    emb = {f: torch.randn(batch, d, generator=gen).requires_grad_(requires_grad) for f, d in dims.items()}
    return emb, torch.randn(batch, num_dense, generator=gen)


def _model(name: str, task: str = "binary", num_classes: int | None = None, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, MIXED_FIELDS, NUM_DENSE, task, num_classes, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- losses


def test_bpr_known_values() -> None:
    pos = torch.tensor([2.0, 0.0, -1.0])
    neg = torch.tensor([0.0, 0.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-2.0))) + math.log(2.0) - math.log(1 / (1 + math.exp(2.0)))) / 3
    torch.testing.assert_close(bpr(pos, neg), torch.tensor(expected))
    # Stable for huge gaps: no inf/nan where log(sigmoid(.)) would underflow.
    assert torch.isfinite(bpr(torch.tensor([-200.0]), torch.tensor([200.0])))
    torch.testing.assert_close(bpr(torch.tensor([-200.0]), torch.tensor([200.0])), torch.tensor(400.0))


def test_pointwise_losses_match_definitions() -> None:
    logits = torch.tensor([0.5, -1.0, 2.0])
    labels = torch.tensor([1.0, 0.0, 0.0])
    probs = torch.sigmoid(logits)
    ref = -(labels * probs.log() + (1 - labels) * (1 - probs).log()).mean()
    torch.testing.assert_close(bce(logits, labels), ref)
    torch.testing.assert_close(mse(logits, labels), ((logits - labels) ** 2).mean())
    class_logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    ref_ce = -(class_logits.log_softmax(1)[[0, 1], [1, 2]]).mean()
    torch.testing.assert_close(cross_entropy(class_logits, torch.tensor([1.0, 2.0])), ref_ce)


def test_loss_for_task() -> None:
    assert loss_for_task("binary") is bce
    assert loss_for_task("regression") is mse
    assert loss_for_task("multiclass") is cross_entropy
    assert loss_for_task("bpr") is bpr
    with pytest.raises(ModelConfigError, match=r"unknown task 'ctr'.*\['binary', 'regression', 'multiclass', 'bpr'\]"):
        loss_for_task("ctr")
    with pytest.raises(ModelConfigError, match="shapes"):
        bpr(torch.zeros(3), torch.zeros(2))


def test_example_losses_average_to_the_task_loss() -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(7, generator=g), (torch.rand(7, generator=g) > 0.5).float()
    class_logits, classes = torch.randn(7, 3, generator=g), torch.tensor([0.0, 1, 2, 2, 1, 0, 0])
    for task, out, y in [
        ("binary", logits, labels),
        ("regression", logits, labels * 3),
        ("multiclass", class_logits, classes),
    ]:
        each = example_losses(task, out, y)
        assert each.shape == (7,)
        torch.testing.assert_close(each.mean(), loss_for_task(task)(out, y))
        torch.testing.assert_close(each[2], loss_for_task(task)(out[2:3], y[2:3]))
    with pytest.raises(ModelConfigError, match="task 'bpr' has no per-example loss"):
        example_losses("bpr", logits, labels)


# ---------------------------------------------------------------------------------------------- metrics


def _auc_reference(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann–Whitney U with average ranks for ties."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_rank_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(300, generator=gen)
    scores = torch.where(torch.rand(300, generator=gen) < 0.3, scores.round(), scores)  # plenty of ties
    labels = (torch.rand(300, generator=gen) < torch.sigmoid(scores)).float()
    expected = _auc_reference(scores.numpy(), labels.numpy())
    assert auc(scores, labels).item() == pytest.approx(expected, abs=1e-6)  # torchmetrics sums in float32


def test_auc_large_logits_do_not_tie_and_one_class_is_nan() -> None:
    # float32 sigmoid maps all of these to 1.0; AUC must still see their order.
    scores = torch.tensor([40.0, 50.0, 60.0, 70.0])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(scores, labels).item() == 1.0
    assert math.isnan(auc(scores, torch.ones(4)).item())
    assert math.isnan(auc(scores, torch.zeros(4)).item())
    with pytest.raises(ModelConfigError, match=r"0 or 1, got values such as \[2.0\]"):
        auc(scores, torch.tensor([0.0, 1.0, 2.0, 1.0]))


def test_pointwise_metrics_match_loops() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(50, generator=gen) * 3
    labels = (torch.rand(50, generator=gen) < 0.4).float()
    ref_ll = 0.0
    ref_acc = 0
    for z, y in zip(logits.tolist(), labels.tolist(), strict=True):
        p = 1 / (1 + math.exp(-z))
        ref_ll -= y * math.log(p) + (1 - y) * math.log(1 - p)
        ref_acc += int((p > 0.5) == (y == 1))
    assert log_loss(logits, labels).item() == pytest.approx(ref_ll / 50, rel=1e-9)
    assert accuracy(logits, labels).item() == pytest.approx(ref_acc / 50)
    class_logits = torch.randn(50, 4, generator=gen)
    classes = torch.randint(0, 4, (50,), generator=gen).float()
    ref_mc = sum(int(np.argmax(row) == c) for row, c in zip(class_logits.numpy(), classes.numpy(), strict=True))
    assert accuracy(class_logits, classes).item() == pytest.approx(ref_mc / 50)
    ref_mc_ll = -sum(
        math.log(math.exp(row[int(c)]) / sum(math.exp(v) for v in row))
        for row, c in zip(class_logits.tolist(), classes.tolist(), strict=True)
    )
    assert log_loss(class_logits, classes).item() == pytest.approx(ref_mc_ll / 50, rel=1e-6)
    preds = torch.randn(50, generator=gen)
    ref_mse = sum((a - b) ** 2 for a, b in zip(preds.tolist(), labels.tolist(), strict=True)) / 50
    assert mse_metric(preds, labels).item() == pytest.approx(ref_mse, rel=1e-9)


def _ranking_reference(
    scores: torch.Tensor, held_out: torch.Tensor, train: torch.Tensor, k: int
) -> tuple[float, float, list[float], list[float]]:
    """Per user: sort the non-training items by score, count held-out hits in the first k."""
    recalls: list[float] = []
    ndcgs: list[float] = []
    for u in range(scores.shape[0]):
        positives = {i for i in range(scores.shape[1]) if held_out[u, i] and not train[u, i]}
        if not positives:
            recalls.append(math.nan)
            ndcgs.append(math.nan)
            continue
        candidates = [i for i in range(scores.shape[1]) if not train[u, i]]
        ranked = sorted(candidates, key=lambda i: -float(scores[u, i]))[:k]
        hits = [1.0 if i in positives else 0.0 for i in ranked]
        recalls.append(sum(hits) / len(positives))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(positives))))
        ndcgs.append(dcg / idcg)
    valid = [i for i, r in enumerate(recalls) if not math.isnan(r)]
    return (
        sum(recalls[i] for i in valid) / len(valid),
        sum(ndcgs[i] for i in valid) / len(valid),
        recalls,
        ndcgs,
    )


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("k", [1, 5, 20, 25, 100])
def test_recall_and_ndcg_match_reference(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    num_users, num_items = 40, 25
    scores = torch.randn(num_users, num_items, generator=gen, dtype=torch.float64)
    train = torch.rand(num_users, num_items, generator=gen) < 0.3
    held_out = torch.rand(num_users, num_items, generator=gen) < 0.15  # overlaps train on purpose
    held_out[:3] = False  # users without held-out items are left out of the mean
    ref_recall, ref_ndcg, per_recall, per_ndcg = _ranking_reference(scores, held_out, train, k)
    for held in (held_out, held_out.to_sparse(), held_out.to_sparse_csr()):
        assert recall_at_k(scores, held, train, k).item() == pytest.approx(ref_recall, rel=1e-12)
        assert ndcg_at_k(scores, held, train.to_sparse(), k).item() == pytest.approx(ref_ndcg, rel=1e-12)
    torch.testing.assert_close(
        recall_at_k(scores, held_out, train, k, reduction="none"),
        torch.tensor(per_recall, dtype=torch.float64),
        equal_nan=True,
    )
    torch.testing.assert_close(
        ndcg_at_k(scores, held_out, train, k, reduction="none"),
        torch.tensor(per_ndcg, dtype=torch.float64),
        equal_nan=True,
    )


def test_ranking_without_mask_perfect_and_empty() -> None:
    held_out = torch.tensor([[True, False, True, False], [False, False, False, False]])
    scores = held_out.double()  # held-out items ranked first: perfect
    assert recall_at_k(scores, held_out, None, 2).item() == 1.0
    assert ndcg_at_k(scores, held_out, None, 2).item() == pytest.approx(1.0)
    assert math.isnan(recall_at_k(scores, torch.zeros_like(held_out), None, 2).item())
    with pytest.raises(ModelConfigError, match="k must be >= 1, got 0"):
        recall_at_k(scores, held_out, None, 0)
    with pytest.raises(ModelConfigError, match=r"held_out must have the shape of scores \(2, 4\)"):
        ndcg_at_k(scores, held_out[:, :3], None, 2)


# ----------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape_and_gradients_reach_everything(name: str) -> None:
    model = _model(name)
    emb, dense = _inputs(MIXED_FIELDS, 16, NUM_DENSE, requires_grad=True)
    out = model(emb, dense)
    assert out.shape == (16,)
    out.sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}: no gradient for {pname}"
    used = ("user", "item") if name in ("mf", "ncf") else tuple(MIXED_FIELDS)
    for feature in used:
        grad = emb[feature].grad
        assert grad is not None and grad.abs().sum() > 0, f"{name}: no gradient for embedding {feature}"


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_multiclass_and_no_dense(name: str) -> None:
    model = _model(name, "multiclass", 5)
    emb, dense = _inputs(MIXED_FIELDS, 7, NUM_DENSE)
    assert model(emb, dense).shape == (7, 5)
    torch.manual_seed(0)
    no_dense = build_model(name, MIXED_FIELDS, 0, "regression", None)  # type: ignore[arg-type]
    assert no_dense(emb, torch.zeros(7, 0)).shape == (7,)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_deterministic_under_seed(name: str) -> None:
    emb, dense = _inputs(MIXED_FIELDS, 8, NUM_DENSE)
    a, b = _model(name), _model(name)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
    torch.testing.assert_close(a(emb, dense), b(emb, dense), rtol=0, atol=0)


def test_equal_dims_need_no_projection() -> None:
    mf = MatrixFactorization({"user": 8, "item": 8}, MFConfig(use_bias=False))
    assert list(mf.parameters()) == []
    emb, dense = _inputs({"user": 8, "item": 8}, 5, 0)
    torch.testing.assert_close(mf(emb, dense), (emb["user"] * emb["item"]).sum(1))
    dlrm = DLRM({"a": 16, "b": 4}, 2, config=DLRMConfig(embedding_dim=16))
    assert isinstance(dlrm.projections["a"], nn.Identity)
    assert dlrm.projection_parameters() == 16 * 4


def test_projection_starts_as_zero_padding() -> None:
    mf = MatrixFactorization(MIXED_UI)
    emb, _ = _inputs(MIXED_UI, 6, 0)
    padded = torch.nn.functional.pad(emb["item"], (0, 16))
    torch.testing.assert_close(mf(emb, torch.zeros(6, 0)), (emb["user"] * padded).sum(1))


@pytest.mark.parametrize(
    ("cls", "config"),
    [(MatrixFactorization, MFConfig()), (NCF, NCFConfig(mlp=(16, 8)))],
)
def test_score_all_equals_forward(cls: Callable[..., nn.Module], config: object) -> None:
    torch.manual_seed(0)
    model = cls(MIXED_UI, config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # non-zero biases
    users = torch.randn(7, 32)
    items = torch.randn(11, 16)
    all_scores = model.score_all(users, items)  # type: ignore[operator]
    pairs = model({"user": users.repeat_interleave(11, 0), "item": items.repeat(7, 1)}, None)
    torch.testing.assert_close(all_scores, pairs.view(7, 11))
    if isinstance(model, NCF):
        torch.testing.assert_close(model.score_all(users, items, chunk_users=3), all_scores)


def test_dlrm_interaction_matches_loops() -> None:
    torch.manual_seed(0)
    model = DLRM(MIXED_FIELDS, NUM_DENSE, config=DLRMConfig(embedding_dim=8, top_mlp=()))
    emb, dense = _inputs(MIXED_FIELDS, 4, NUM_DENSE)
    vectors = [model.bottom(dense)] + [model.projections[f](emb[f]) for f in MIXED_FIELDS]  # type: ignore[misc]
    dots = [(vectors[i] * vectors[j]).sum(1) for i in range(5) for j in range(i + 1, 5)]
    top_input = torch.cat([vectors[0], torch.stack(dots, 1)], 1)
    torch.testing.assert_close(model(emb, dense), model.top(top_input).squeeze(1))


def test_deepfm_second_order_matches_pairwise_sum() -> None:
    torch.manual_seed(0)
    model = DeepFM(MIXED_FIELDS, NUM_DENSE, config=DeepFMConfig(embedding_dim=8))
    with torch.no_grad():  # silence the deep and first-order parts
        model.deep[-1].weight.zero_()
        model.deep[-1].bias.zero_()
        assert model.first_order is not None
        model.first_order.weight.zero_()
        model.bias.fill_(0.25)
    emb, dense = _inputs(MIXED_FIELDS, 4, NUM_DENSE)
    vectors = [model.projections[f](emb[f]) for f in MIXED_FIELDS]
    fm = sum((vectors[i] * vectors[j]).sum(1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(model(emb, dense), fm + 0.25)


# -------------------------------------------------------------------------------------- learning tests


class _Tables(nn.Module):
    """Plain ``nn.Embedding`` tables standing in for the (sharded) embedding layer."""

    def __init__(self, vocab: dict[str, int], dims: dict[str, int]) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({f: nn.Embedding(vocab[f], dims[f]) for f in dims})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.1)

    def forward(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f: table(ids[f]) for f, table in self.tables.items()}


def _train(
    model: nn.Module,
    tables: _Tables,
    ids: dict[str, torch.Tensor],
    dense: torch.Tensor,
    labels: torch.Tensor,
    task: str,
    steps: int = 200,
) -> tuple[float, float, torch.Tensor]:
    loss_fn = loss_for_task(task)
    optimizer = torch.optim.Adam([*model.parameters(), *tables.parameters()], lr=0.02)
    first = last = math.nan
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(tables(ids), dense), labels)
        loss.backward()
        optimizer.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    with torch.no_grad():
        return first, last, model(tables(ids), dense)


@pytest.mark.parametrize("name", ["mf", "ncf"])
def test_user_item_models_learn_planted_preferences(name: str) -> None:
    torch.manual_seed(0)
    num_users, num_items = 30, 40
    planted = torch.randn(num_users, 4) @ torch.randn(4, num_items)
    users, items = torch.meshgrid(torch.arange(num_users), torch.arange(num_items), indexing="ij")
    ids = {"user": users.reshape(-1), "item": items.reshape(-1)}
    labels = (planted.reshape(-1) > 0).float()
    tables = _Tables({"user": num_users, "item": num_items}, MIXED_UI)
    model = (
        build_model(name, MIXED_UI, 0, "binary", mlp=(32, 16))
        if name == "ncf"
        else build_model(name, MIXED_UI, 0, "binary")
    )
    first, last, logits = _train(model, tables, ids, torch.zeros(len(labels), 0), labels, "binary")
    assert first == pytest.approx(math.log(2), abs=0.05)
    assert last < 0.1 * first, (first, last)
    assert auc(logits, labels).item() > 0.95


def test_mf_bpr_ranks_held_in_positives_first() -> None:
    torch.manual_seed(0)
    num_users, num_items = 30, 40
    planted = torch.randn(num_users, 4) @ torch.randn(4, num_items)
    positives = planted > planted.quantile(0.8, dim=1, keepdim=True)
    pos_users, pos_items = positives.nonzero(as_tuple=True)
    tables = _Tables({"user": num_users, "item": num_items}, MIXED_UI)
    model = build_model("mf", MIXED_UI, 0, "bpr")
    optimizer = torch.optim.Adam([*model.parameters(), *tables.parameters()], lr=0.02)
    for _ in range(200):
        neg_items = torch.randint(0, num_items, pos_items.shape)
        optimizer.zero_grad()
        pos = model(tables({"user": pos_users, "item": pos_items}), None)
        neg = model(tables({"user": pos_users, "item": neg_items}), None)
        loss_for_task("bpr")(pos, neg).backward()
        optimizer.step()
    with torch.no_grad():
        scores = model.score_all(tables.tables["user"].weight, tables.tables["item"].weight)  # type: ignore[operator]
    assert recall_at_k(scores, positives, None, 8).item() > 0.8


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_field_models_learn_planted_logit(name: str, task: str) -> None:
    """Train on 768 rows of a planted additive + user×item logit, evaluate on 512 unseen rows."""
    torch.manual_seed(0)
    n_train, n = 768, 1280
    vocab = {"user": 20, "item": 20, "f0": 10, "f1": 5}
    ids = {f: torch.randint(0, v, (n,)) for f, v in vocab.items()}
    dense = torch.randn(n, NUM_DENSE)
    num_classes = 3 if task == "multiclass" else None
    heads = num_classes or 1
    scores = sum(torch.randn(v, heads)[ids[f]] for f, v in vocab.items()) + dense @ torch.randn(NUM_DENSE, heads)
    scores = scores + 0.5 * torch.randn(20, 20, heads)[ids["user"], ids["item"]]  # a user × item term
    labels = (scores.squeeze(1) > 0).float() if heads == 1 else scores.argmax(1).float()
    tables = _Tables(vocab, MIXED_FIELDS)
    model = build_model(name, MIXED_FIELDS, NUM_DENSE, task, num_classes)  # type: ignore[arg-type]
    train_ids = {f: v[:n_train] for f, v in ids.items()}
    first, last, _ = _train(model, tables, train_ids, dense[:n_train], labels[:n_train], task)
    assert last < 0.1 * first, (first, last)
    model.eval()
    with torch.no_grad():
        out = model(tables({f: v[n_train:] for f, v in ids.items()}), dense[n_train:])
    if task == "binary":
        assert auc(out, labels[n_train:]).item() > 0.85  # DLRM 0.96, DeepFM 0.89
    else:
        majority = labels[n_train:].long().bincount().max().item() / len(
            out
        )  # 0.43 here; DLRM reaches 0.78, DeepFM 0.59
        assert accuracy(out, labels[n_train:]).item() > majority + 0.1


# ------------------------------------------------------------------------------------------------ errors


def test_build_model_errors() -> None:
    with pytest.raises(ModelConfigError, match=r"unknown model 'fm', expected one of \['mf', 'ncf', 'dlrm'"):
        build_model("fm", MIXED_FIELDS, 0, "binary")  # type: ignore[arg-type]
    with pytest.raises(ModelConfigError, match=r"feature_dims has no \['user'\].*user_feature"):
        build_model("ncf", {"uid": 8, "item": 8}, 0, "binary")
    assert build_model("ncf", {"uid": 8, "item": 8}, 0, "binary", user_feature="uid").features == (
        "uid",
        "item",
    )
    with pytest.raises(ModelConfigError, match=r"unknown options \['top'\]; DLRMConfig takes"):
        build_model("dlrm", MIXED_FIELDS, 2, "binary", top=(4,))
    with pytest.raises(ModelConfigError, match="no multiclass output"):
        build_model("mf", MIXED_FIELDS, 0, "multiclass", 3)
    with pytest.raises(ModelConfigError, match="needs num_classes >= 2, got None"):
        build_model("dlrm", MIXED_FIELDS, 2, "multiclass")
    with pytest.raises(ModelConfigError, match="unknown task 'ctr'"):
        build_model("dlrm", MIXED_FIELDS, 2, "ctr")
    with pytest.raises(ModelConfigError, match="needs at least two vectors"):
        build_model("dlrm", {"a": 4}, 0, "binary")
    # YAML lists become tuples.
    assert build_model("dlrm", MIXED_FIELDS, 2, "binary", top_mlp=[8]).config.top_mlp == (8,)


def test_config_validation() -> None:
    with pytest.raises(ModelConfigError, match=r"NCFConfig.mlp must hold positive ints, got \[16, 0\]"):
        NCFConfig(mlp=(16, 0))
    with pytest.raises(ModelConfigError, match=r"DLRMConfig.dropout must be in \[0, 1\), got 1.5"):
        DLRMConfig(dropout=1.5)
    with pytest.raises(ModelConfigError, match="deep_mlp is empty"):
        DeepFMConfig(deep_mlp=())
    with pytest.raises(ModelConfigError, match=r"output dims must be positive ints, got \{'f0': 0\}"):
        DLRM({"f0": 0, "f1": 4}, 2)


def test_forward_input_errors() -> None:
    model = _model("dlrm")
    emb, dense = _inputs(MIXED_FIELDS, 4, NUM_DENSE)
    with pytest.raises(ModelConfigError, match=r"no pooled embedding for features \['f1'\]"):
        model({f: t for f, t in emb.items() if f != "f1"}, dense)
    with pytest.raises(ModelConfigError, match=r"'f0' has shape \(4, 4\), expected \[B, 8\]"):
        model({**emb, "f0": torch.zeros(4, 4)}, dense)
    with pytest.raises(ModelConfigError, match=r"dense features have shape \(4, 2\), expected \[4, 3\]"):
        model(emb, dense[:, :2])


def _scored(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if task == "multiclass":
        return torch.randn(n, 5, generator=g), torch.randint(0, 5, (n,), generator=g)
    logits = torch.randn(n, generator=g) * 3
    if task == "regression":
        return logits, logits + torch.randn(n, generator=g)
    logits[:50] = logits[50:100]  # ties across positives and negatives
    return logits, (torch.rand(n, generator=g) < torch.sigmoid(logits)).float()


@pytest.mark.parametrize("task", ["binary", "regression", "multiclass"])
def test_accumulated_metrics_equal_the_metrics_of_all_rows(task: str) -> None:
    logits, labels = _scored(task, 30_000, 0)
    acc = TaskMetricsAccumulator(task)
    for a, b in zip(logits.split(1001), labels.split(1001), strict=True):
        acc.update(a, b)
    got, want = acc.compute(), task_metrics(task, logits, labels)
    assert got.keys() == want.keys()
    for k in got:
        tol = 1e-4 if k == "auc" else 1e-12  # AUC: pairs that share one of 2^20 score bins count as ties
        assert got[k] == pytest.approx(want[k], abs=tol), k
    assert TaskMetricsAccumulator(task).compute() == dict.fromkeys(want, math.nan)


def _run_distributed_metrics(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    logits, labels = _scored("binary", 20_000, 1)
    mine = slice(rank * 20_000 // world_size, (rank + 1) * 20_000 // world_size)
    acc = TaskMetricsAccumulator("binary")
    for a, b in zip(logits[mine].split(512), labels[mine].split(512), strict=True):
        acc.update(a, b)
    state = acc.state()
    dist.all_reduce(state)
    got, want = acc.compute(state), task_metrics("binary", logits, labels)  # every rank: the gathered result
    assert abs(got["auc"] - want["auc"]) < 1e-4, (got, want)
    assert got["log_loss"] == pytest.approx(want["log_loss"], abs=1e-12)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)


@pytest.mark.multirank
def test_metrics_reduced_over_two_ranks_equal_the_gathered_ones() -> None:
    from tests.multiprocess import run_ranks

    run_ranks(_run_distributed_metrics, 2)

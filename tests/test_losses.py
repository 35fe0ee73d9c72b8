"""Golden and property tests for retrikt.distill.losses.

Expected values are computed by hand with plain Python ``math`` on tiny tensors, never with the
torch ops under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from retrikt.distill import losses

TOL = dict(rel_tol=1e-5, abs_tol=1e-6)


# ----------------------------------------------------------------------- hand-computation helpers #

def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    es = [math.exp(x - m) for x in xs]
    return [e / sum(es) for e in es]


def log_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def soft_ce(s: list[float], t: list[float], temp: float, probs: bool = False) -> float:
    p = t if probs else softmax([x / temp for x in t])
    return -sum(pi * li for pi, li in zip(p, log_softmax([x / temp for x in s])))


def dot(u, v) -> float:
    return sum(a * b for a, b in zip(u, v))


def sub(u, v) -> list[float]:
    return [a - b for a, b in zip(u, v)]


def angle(points, vertex: int, j: int, k: int) -> float:
    """cos of the angle at ``points[vertex]`` between the rays to ``points[j]``, ``points[k]``."""
    u, v = sub(points[vertex], points[j]), sub(points[vertex], points[k])
    nu, nv = math.sqrt(dot(u, u)), math.sqrt(dot(v, v))
    return 0.0 if nu == 0 or nv == 0 else dot(u, v) / (nu * nv)


def smooth_l1(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def close(tensor: torch.Tensor, value: float) -> bool:
    return math.isclose(float(tensor.detach()), value, **TOL)


# ------------------------------------------------------------------------------------- KD #

S = [[1.0, 2.0, 3.0], [0.5, -0.5, 0.0]]
T_LOGITS = [[3.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
T_PROBS = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]


def test_end_weighted_nll_golden():
    # labels: 5 = EOS, -100 = ignored (its nll is 0 by the cross-entropy's ignore_index)
    nll = torch.tensor([0.5, 1.25, 2.0, 0.0, 0.75, 3.0])
    labels = torch.tensor([7, 9, 5, -100, 8, 5])
    # by hand: 0.5 + 1.25 + 4 * 2.0 + 0 + 0.75 + 4 * 3.0 = 22.5
    assert math.isclose(float(losses.end_weighted_nll(nll, labels, 5, 4.0)), 22.5, **TOL)
    assert math.isclose(float(losses.end_weighted_nll(nll, labels, 5, 1.0)), 7.5, **TOL)   # the plain sum
    assert math.isclose(float(losses.end_weighted_nll(nll, labels, 6, 4.0)), 7.5, **TOL)   # no end token
    w = torch.tensor([1.0, 2.0], requires_grad=True)                                           # gradient scales
    losses.end_weighted_nll(w, torch.tensor([5, 1]), 5, 3.0).backward()
    assert w.grad.tolist() == [3.0, 1.0]


def test_kd_loss_golden_no_t_squared():
    expected = sum(soft_ce(s, t, 2.0) for s, t in zip(S, T_LOGITS)) / 2
    assert close(losses.kd_loss(torch.tensor(S), torch.tensor(T_LOGITS), 2.0), expected)


def test_kd_loss_golden_probability_targets():
    expected = sum(soft_ce(s, t, 2.0, probs=True) for s, t in zip(S, T_PROBS)) / 2
    got = losses.kd_loss(torch.tensor(S), torch.tensor(T_PROBS), 2.0, targets_are_probs=True)
    assert close(got, expected)


def test_kd_ce_loss_golden_and_parts():
    labels = [2, 0]
    kd = sum(soft_ce(s, t, 2.0) for s, t in zip(S, T_LOGITS)) / 2
    ce = -sum(log_softmax(s)[y] for s, y in zip(S, labels)) / 2
    out = losses.kd_ce_loss(torch.tensor(S), torch.tensor(T_LOGITS), torch.tensor(labels), 0.8, 2.0)
    assert close(out.total, 0.8 * kd + 0.2 * ce)
    assert close(out.parts["kd"], kd) and close(out.parts["ce"], ce)


def test_kd_gradients_reach_student_only():
    s = torch.tensor(S, requires_grad=True)
    t = torch.tensor(T_LOGITS, requires_grad=True)
    losses.kd_ce_loss(s, t, torch.tensor([2, 0]), 0.5, 2.0).total.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


# -------------------------------------------------------------------------------- RetriKT #

CANDS = [[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0]]  # cos with [1, 0]: 1, 0, -1; with [0, 1]: 0, 1, 0


def test_similarity_distribution_golden_shared_and_per_query():
    q = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    expected = [softmax([2.0, 0.0, -2.0]), softmax([0.0, 2.0, 0.0])]  # tau = 0.5
    shared = losses.similarity_distribution(q, torch.tensor(CANDS), 0.5)
    per_query = losses.similarity_distribution(q, torch.tensor([CANDS, CANDS]), 0.5)
    logp = losses.similarity_distribution(q, torch.tensor(CANDS), 0.5, log=True)
    for b in range(2):
        for i in range(3):
            assert math.isclose(float(shared[b, i]), expected[b][i], **TOL)
            assert math.isclose(float(per_query[b, i]), expected[b][i], **TOL)
            assert math.isclose(float(logp[b, i]), math.log(expected[b][i]), **TOL)


def test_retrieval_kl_golden_batchmean_and_separate_taus():
    cands = torch.tensor([CANDS, CANDS])
    t_q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s_q = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # row 2 identical to the teacher -> KL 0
    pt, ps = softmax([1.0, 0.0, -1.0]), softmax([0.0, 1.0, 0.0])
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    assert close(losses.retrieval_kl_loss(t_q, cands, s_q, cands, 1.0), kl / 2)
    pt2, ps2 = softmax([2.0, 0.0, -2.0]), softmax([0.0, 1.0, 0.0])
    kl2 = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt2, ps2))
    got = losses.retrieval_kl_loss(t_q[:1], cands[:1], s_q[:1], cands[:1], 1.0, tau_teacher=0.5)
    assert close(got, kl2)


def test_retrieval_kl_zero_when_equal_nonnegative_and_student_grads_only():
    g = torch.Generator().manual_seed(0)
    tq, tc = torch.randn(4, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    assert abs(float(losses.retrieval_kl_loss(tq, tc, tq.clone(), tc.clone(), 0.1))) < 1e-6
    tq.requires_grad_(), tc.requires_grad_()
    sq = torch.randn(4, 8, generator=g, requires_grad=True)
    sc = torch.randn(5, 8, generator=g, requires_grad=True)  # shared candidate set
    loss = losses.retrieval_kl_loss(tq, tc, sq, sc.expand(4, 5, 8), 0.1)
    assert float(loss.detach()) >= 0
    loss.backward()
    assert sq.grad.abs().sum() > 0 and sc.grad.abs().sum() > 0
    assert tq.grad is None and tc.grad is None


def test_retrieval_aggregate_and_predict_golden():
    sims = torch.tensor([[1.0, 0.0], [0.2, 0.6]])
    labels = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                           [[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]]])
    w0, w1 = softmax([2.0, 0.0]), softmax([0.4, 1.2])  # tau = 0.5
    expected = [[w0[0], w0[1], 0.0],
                [0.5 * w1[0], 0.5 * w1[0] + 0.2 * w1[1], 0.8 * w1[1]]]
    got = losses.retrieval_aggregate(sims, labels, 0.5)
    for b in range(2):
        for c in range(3):
            assert math.isclose(float(got[b, c]), expected[b][c], **TOL)
    assert losses.retrieval_predict(sims, labels, 0.5).tolist() == [0, 2]


# ---------------------------------------------------------------------------------- MGSKD #

T_PTS = [[0.0, 0.0], [2.0, 0.0], [1.0, 2.0]]  # angles (cos) at vertices: 1/√5, 1/√5, 3/5
S_PTS = [[0.0, 0.0], [3.0, 0.0], [1.0, 1.0]]  # 1/√2, 2/√5, -1/√10 (no right angles)


def hand_pair_loss(s, t, n_heads: int) -> float:
    d = len(s[0]) // n_heads
    tot = 0.0
    for h in range(n_heads):
        sl = slice(h * d, (h + 1) * d)
        for i in range(len(s)):
            for j in range(len(s)):
                diff = dot(s[i][sl], s[j][sl]) - dot(t[i][sl], t[j][sl])
                tot += (diff / math.sqrt(d)) ** 2
    return tot / (n_heads * len(s) ** 2)


def hand_triplet_loss(s, t, anchors) -> float:
    terms = [smooth_l1(angle(s, a, j, k) - angle(t, a, j, k))
             for a in anchors for j in range(3) for k in range(3) if len({a, j, k}) == 3]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("n_heads", [1, 2])
def test_mgskd_token_loss_golden_all_anchors(n_heads):
    expected = hand_pair_loss(S_PTS, T_PTS, n_heads) + hand_triplet_loss(S_PTS, T_PTS, [0, 1, 2])
    got = losses.mgskd_token_loss(torch.tensor([S_PTS]), torch.tensor([T_PTS]), torch.ones(1, 3),
                             n_heads=n_heads)
    assert close(got, expected)


def test_mgskd_token_loss_golden_teacher_anchor_selection():
    rows = [softmax([dot(T_PTS[i], T_PTS[j]) / math.sqrt(2) for j in range(3)]) for i in range(3)]
    received = [sum(r[j] for r in rows) for j in range(3)]
    anchor = max(range(3), key=received.__getitem__)  # the token receiving most attention
    expected = hand_pair_loss(S_PTS, T_PTS, 1) + hand_triplet_loss(S_PTS, T_PTS, [anchor])
    got = losses.mgskd_token_loss(torch.tensor([S_PTS]), torch.tensor([T_PTS]), torch.ones(1, 3),
                             n_heads=1, k1=1, k2=2)
    assert anchor == 2 and close(got, expected)


def test_mgskd_sample_loss_golden_with_mean_pooling():
    pad = [9.0, -9.0]
    t = torch.tensor([[T_PTS[0], pad], [[1.0, 0.0], [3.0, 0.0]], [T_PTS[2], pad]])
    s = torch.tensor([[S_PTS[0], pad], [S_PTS[1], S_PTS[1]], [S_PTS[2], pad]])
    mask = torch.tensor([[1, 0], [1, 1], [1, 0]])
    terms = [smooth_l1(angle(S_PTS, i, j, k) - angle(T_PTS, i, j, k))
             for i in range(3) for j in range(3) for k in range(3)]
    assert close(losses.mgskd_sample_loss(s, t, mask, n_heads=1), sum(terms) / 27)


def test_mgskd_layer_map():
    assert losses.mgskd_layer_map(2, 6) == [(0, 0), (1, 3), (2, 6)]
    assert losses.mgskd_layer_map(4, 6) == [(0, 0), (2, 3), (4, 6)]
    assert losses.mgskd_layer_map(4, 12) == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]


def _random_hidden(b=3, t=5, h=8, seed=0):
    return torch.randn(b, t, h, generator=torch.Generator().manual_seed(seed))


def test_mgskd_padding_invariance():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    s, t = _random_hidden(seed=1), _random_hidden(seed=2)
    pad = ~mask.bool()[..., None]
    s2 = torch.where(pad, _random_hidden(seed=3) * 10, s)
    t2 = torch.where(pad, _random_hidden(seed=4) * 10, t)
    for kw in ({}, {"k1": 2, "k2": 2}):
        a = losses.mgskd_token_loss(s, t, mask, n_heads=2, **kw)
        assert torch.allclose(a, losses.mgskd_token_loss(s2, t2, mask, n_heads=2, **kw), atol=1e-6)
        assert float(a) >= 0
    a = losses.mgskd_sample_loss(s, t, mask, n_heads=2)
    assert torch.allclose(a, losses.mgskd_sample_loss(s2, t2, mask, n_heads=2), atol=1e-6)
    # one shorter sequence: dropping all-padding columns changes nothing either
    short = losses.mgskd_token_loss(s[1:, :3], t[1:, :3], mask[1:, :3], n_heads=2)
    assert torch.allclose(short, losses.mgskd_token_loss(s2[1:], t2[1:], mask[1:], n_heads=2), atol=1e-6)


def test_mgskd_loss_combination_and_gradients():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    s_states = [_random_hidden(seed=10 + i).requires_grad_() for i in range(3)]
    t_states = [_random_hidden(seed=20 + i).requires_grad_() for i in range(7)]
    out = losses.mgskd_loss(s_states, t_states, mask, n_heads=2)
    token = (losses.mgskd_token_loss(s_states[0], t_states[0], mask, n_heads=2)
             + losses.mgskd_token_loss(s_states[1], t_states[3], mask, n_heads=2))
    sample = losses.mgskd_sample_loss(s_states[2], t_states[6], mask, n_heads=2)
    assert torch.allclose(out.total, 4 * sample + token)
    assert torch.allclose(out.parts["token"], token) and torch.allclose(out.parts["sample"], sample)
    out.total.backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in s_states)
    assert all(x.grad is None for x in t_states)


def test_mgskd_zero_when_student_equals_teacher():
    h = _random_hidden()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    total = losses.mgskd_loss([h, h, h], [h, h, h], mask, n_heads=2).total
    assert float(total) == pytest.approx(0, abs=1e-7)


# ---------------------------------------------------------------------------------- AD-KD #

E_VALS = [[1.0, -2.0], [0.5, 3.0]]                                   # E [T=2, H=2]
U_VALS = [[[0.3, -0.2, 0.1], [0.4, 0.0, -0.5]],
          [[-0.1, 0.2, 0.6], [0.2, -0.3, 0.1]]]                      # logits_c = Σ_th E_th U_thc


def hand_attribution(view: int, top_k: int | None = None) -> list[float]:
    z = [sum(E_VALS[t][h] * U_VALS[t][h][c] for t in range(2) for h in range(2)) for c in range(3)]
    p = softmax(z)
    # d(−log p_c)/dz_k = p_k − δ_kc, dz_k/dE_th = U_thk
    g = [[sum((p[k] - (k == view)) * U_VALS[t][h][k] for k in range(3)) for h in range(2)]
         for t in range(2)]
    sal = [[abs(g[t][h] * E_VALS[t][h]) for h in range(2)] for t in range(2)]
    if top_k is not None:
        sal = [sorted(row, reverse=True)[:top_k] for row in sal]
    a = [math.sqrt(sum(x * x for x in row)) for row in sal]
    n = math.sqrt(sum(x * x for x in a))
    return [x / n for x in a]


def _linear_logits():
    e = torch.tensor([E_VALS], requires_grad=True)
    return e, torch.einsum("bth,thc->bc", e, torch.tensor(U_VALS))


@pytest.mark.parametrize("top_k", [None, 1, 0.5])
def test_attribution_golden_multiview(top_k):
    e, logits = _linear_logits()
    got = losses.attribution(logits, e, top_k=top_k)
    assert got.shape == (1, 3, 2) and not got.requires_grad
    for c in range(3):
        exp = hand_attribution(c, None if top_k is None else 1)
        assert all(math.isclose(float(got[0, c, t]), exp[t], **TOL) for t in range(2))


def test_attribution_golden_gold_label_view_and_callable():
    e, logits = _linear_logits()
    got = losses.attribution(logits, e, labels=torch.tensor([1]))
    via_fn = losses.attribution(lambda x: torch.einsum("bth,thc->bc", x, torch.tensor(U_VALS)), e,
                           labels=torch.tensor([1]))
    exp = hand_attribution(1)
    assert got.shape == (1, 1, 2) and torch.allclose(got, via_fn)
    assert all(math.isclose(float(got[0, 0, t]), exp[t], **TOL) for t in range(2))


def test_adkd_attr_loss_golden():
    attr_t = torch.tensor([[[0.6, 0.8, 0.0], [1.0, 0.0, 0.0]]])  # [B=1, V=2, T=3]
    attr_s = torch.tensor([[[0.8, 0.6, 0.5], [0.0, 1.0, 0.0]]])  # 0.5 sits on a padding token
    mask = torch.tensor([[1, 1, 0]])
    expected = (0.2 ** 2 + 0.2 ** 2) / 2 + (1.0 + 1.0) / 1
    assert close(losses.adkd_attr_loss(attr_s, attr_t, mask), expected)
    assert close(losses.adkd_attr_loss(attr_s[:, 0], attr_t[:, 0], mask), 0.04)
    assert close(losses.adkd_attr_loss(attr_s[:, 0], attr_t[:, 0], mask, loss_func="L1"), 0.2)


def test_adkd_loss_golden_total():
    s, t, y = torch.tensor(S), torch.tensor(T_LOGITS), torch.tensor([2, 0])
    attr_t = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    attr_s = torch.tensor([[0.8, 0.6], [1.0, 0.0]])
    kd = sum(soft_ce(a, b, 2.0) for a, b in zip(S, T_LOGITS)) / 2
    ce = -sum(log_softmax(a)[c] for a, c in zip(S, [2, 0])) / 2
    attr = 0.08 / 3
    out = losses.adkd_loss(s, t, y, attr_s, attr_t, alpha=0.8, temperature=2.0, beta=10.0)
    assert close(out.total, 0.8 * kd + 0.2 * ce + 10.0 * attr)
    assert close(out.parts["attr"], attr)


class _Tiny(torch.nn.Module):
    """Embedding + (optionally masked) sum pooling + linear head: a stand-in for BERT."""

    def __init__(self, seed: int, masked: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head, self.masked = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 3), masked

    def forward(self, ids, mask):
        e = self.emb(ids)
        m = mask[..., None].to(e) if self.masked else torch.ones_like(e)
        return e, self.head((torch.tanh(e) * m).sum(1))


IDS = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_adkd_create_graph_student_grads_only():
    student, teacher = _Tiny(0), _Tiny(1)
    e_t, z_t = teacher(IDS, MASK)
    attr_t = losses.attribution(z_t, e_t, MASK, top_k=0.5)
    e_s, z_s = student(IDS, MASK)
    assert not losses.attribution(z_s, e_s, MASK).requires_grad  # no create_graph -> detached
    attr_s = losses.attribution(z_s, e_s, MASK, create_graph=True)
    attr_loss = losses.adkd_attr_loss(attr_s, attr_t, MASK)
    assert float(attr_loss.detach()) >= 0
    # the head reaches attr_s only through ∂/∂E, so a gradient there proves create_graph works
    (head_grad,) = torch.autograd.grad(attr_loss, student.head.weight, retain_graph=True)
    assert head_grad.abs().sum() > 0
    losses.adkd_loss(z_s, z_t, torch.tensor([0, 2]), attr_s, attr_t, MASK).total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_adkd_padding_invariance_and_zero_when_equal():
    model = _Tiny(0)
    e, z = model(IDS, MASK)
    attr = losses.attribution(z, e, MASK)
    assert (attr[0, :, 3] == 0).all() and (attr[1, :, 2:] == 0).all()
    assert torch.allclose(attr.norm(dim=-1), torch.ones(2, 3))
    # more padding (different pad ids) leaves attributions and the loss unchanged
    ids2 = torch.cat([IDS, torch.tensor([[7, 9], [3, 8]])], 1)
    mask2 = torch.cat([MASK, torch.zeros(2, 2, dtype=MASK.dtype)], 1)
    e2, z2 = model(ids2, mask2)
    attr2 = losses.attribution(z2, e2, mask2)
    assert torch.allclose(attr2[..., :4], attr, atol=1e-6) and (attr2[..., 4:] == 0).all()
    other_model = _Tiny(5)
    e_o, z_o = other_model(IDS, MASK)
    e_o2, z_o2 = other_model(ids2, mask2)
    other, other2 = losses.attribution(z_o, e_o, MASK), losses.attribution(z_o2, e_o2, mask2)
    loss, loss2 = losses.adkd_attr_loss(attr, other, MASK), losses.adkd_attr_loss(attr2, other2, mask2)
    assert torch.allclose(loss, loss2)
    assert float(losses.adkd_attr_loss(attr, attr, MASK)) == 0
    # a model that leaks gradient to padding: the mask still zeroes those positions
    e3, z3 = _Tiny(0, masked=False)(IDS, MASK)
    assert (losses.attribution(z3, e3, MASK)[0, :, 3] == 0).all()


def test_retrieval_kl_mask_golden_and_finite_grads():
    """A masked candidate is out of both distributions: the loss is the KL over the kept ones, by hand."""
    cands = torch.tensor([CANDS, CANDS])
    t_q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    s_q = torch.tensor([[0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    cos_t, cos_s = [1.0, 0.0, -1.0], [0.0, 1.0, 0.0]  # cosines of t_q / s_q with CANDS (tau 1)
    pt1, ps1 = softmax(cos_t[:2]), softmax(cos_s[:2])
    pt2, ps2 = softmax(cos_t), softmax(cos_s)
    kl1 = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt1, ps1))
    kl2 = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt2, ps2))
    loss = losses.retrieval_kl_loss(t_q, cands, s_q, cands, 1.0, mask=mask)
    assert close(loss, (kl1 + kl2) / 2)
    loss.backward()
    assert torch.isfinite(s_q.grad).all() and s_q.grad.abs().sum() > 0
    full = torch.ones(2, 3, dtype=torch.bool)  # an all-True mask is the unmasked loss
    assert close(losses.retrieval_kl_loss(t_q, cands, s_q, cands, 1.0, mask=full),
                 losses.retrieval_kl_loss(t_q, cands, s_q, cands, 1.0))

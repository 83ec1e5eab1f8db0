"""RMBERT: shapes, masks, the exact fast path, ablation switches, and learning one batch."""

import dataclasses

import pytest
import torch

from rmbert.models.rmbert import RMBERT, RMBERTConfig
from rmbert.types import NewsRepr

B, C, M, L, D = 3, 5, 7, 6, 16
ABLATIONS = [
    {"prev_query": False},
    {"prev_memory": False},
    {"attention": False},
    {"query_attention": "sigmoid"},
]


def inputs(seed=0, empty_history_row=None):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(B, M, D, generator=g)
    hmask = torch.rand(B, M, generator=g) > 0.3
    hmask[:, 0] = True
    if empty_history_row is not None:
        hmask[empty_history_row] = False
    cand = NewsRepr(
        cls=torch.randn(B, C, D, generator=g),
        tokens=torch.randn(B, C, L, D, generator=g),
        mask=torch.rand(B, C, L, generator=g) > 0.3,
    )
    cand.mask[..., 0] = True
    return H, hmask, cand


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return RMBERT(RMBERTConfig(dim=D, **{"steps": 3, **kw})).double()


def dbl(H, hmask, cand):
    return H.double(), hmask, NewsRepr(cand.cls.double(), cand.tokens.double(), cand.mask)


def check_new_path(new, base, weight, new_args, base_args):
    """Load base's weights into new: with the new path's `weight` zeroed new scores as base;
    with it random it does not (the path reaches the score)."""
    new.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        weight.zero_()
    assert torch.allclose(new(*new_args), base(*base_args))
    with torch.no_grad():
        weight.normal_()
    assert not torch.allclose(new(*new_args), base(*base_args))


def test_shapes_and_recorded_attention():
    m = model()
    H, hmask, cand = dbl(*inputs())
    out = m.reason(m.user_state(NewsRepr(H, None, None), hmask), cand, record=True)
    logits, att = out.logits, out.attentions
    assert logits.shape == (B, C)
    assert att["title"].shape == (B, C, 3, L) and att["history"].shape == (B, C, 3, M)
    # softmax attention sums to one over the unmasked positions, and is zero on padding
    assert torch.allclose(att["title"].sum(-1), torch.ones(B, C, 3, dtype=torch.float64))
    assert (att["title"][~cand.mask[:, :, None, :].expand(-1, -1, 3, -1)] == 0).all()
    assert (att["history"][~hmask[:, None, None, :].expand(-1, C, 3, -1)] == 0).all()


@pytest.mark.parametrize("prev_memory", [True, False])
def test_fast_path_equals_direct_form(prev_memory):
    fast = model(prev_memory=prev_memory)
    direct = model(prev_memory=prev_memory, fast_path=False)
    direct.load_state_dict(fast.state_dict())
    H, hmask, cand = dbl(*inputs(1))
    H1, H2 = H.clone().requires_grad_(), H.clone().requires_grad_()
    y1 = fast(H1, hmask, cand)
    y2 = direct(H2, hmask, cand)
    assert torch.allclose(y1, y2, atol=1e-10)
    w = torch.randn(B, C, dtype=torch.float64)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    assert torch.allclose(H1.grad, H2.grad, atol=1e-10)
    for (n, p1), (_, p2) in zip(fast.named_parameters(), direct.named_parameters()):
        if p1.grad is None or p2.grad is None:  # W_r is unused without the previous memory
            assert p1.grad is None and p2.grad is None and not prev_memory and n.startswith("W_r"), n
            continue
        assert torch.allclose(p1.grad, p2.grad, atol=1e-10), n


def test_padding_never_matters():
    m = model()
    H, hmask, cand = dbl(*inputs(2))
    base = m(H, hmask, cand)
    H2 = torch.where(hmask[..., None], H, torch.randn_like(H) * 100)
    tok2 = torch.where(cand.mask[..., None], cand.tokens, torch.randn_like(cand.tokens) * 100)
    again = m(H2, hmask, NewsRepr(cand.cls, tok2, cand.mask))
    assert torch.allclose(base, again, atol=1e-10)


def test_empty_history_is_a_candidate_only_prior():
    m = model()
    H, hmask, cand = dbl(*inputs(3, empty_history_row=0))
    logits = m(H, hmask, cand)
    assert torch.isfinite(logits).all()
    # the empty-history row does not depend on H at all
    H2 = H.clone()
    H2[0] = torch.randn(M, D, dtype=torch.float64)
    assert torch.allclose(m(H2, hmask, cand)[0], logits[0])
    # and its gradients are finite
    Hg = H.clone().requires_grad_()
    m(Hg, hmask, cand).sum().backward()
    assert torch.isfinite(Hg.grad).all()


@pytest.mark.parametrize("change", ABLATIONS)
def test_each_ablation_changes_the_computation(change):
    full = model()
    ablated = model(**change)
    ablated.load_state_dict(full.state_dict())
    H, hmask, cand = dbl(*inputs(4))
    assert not torch.allclose(full(H, hmask, cand), ablated(H, hmask, cand), atol=1e-6)


def test_ablations_cut_the_named_dependency():
    H, hmask, cand = dbl(*inputs(5))
    # w/o PQ: W_k's k_{i-1} half gets no gradient
    m = model(prev_query=False)
    m(H, hmask, cand).sum().backward()
    assert m.W_k.weight.grad[:, D:].abs().max() == 0
    # w/o PM: W_r is unused
    m = model(prev_memory=False)
    m(H, hmask, cand).sum().backward()
    assert m.W_r.weight.grad is None or m.W_r.weight.grad.abs().max() == 0
    # w/o Att: attention vectors are unused and weights are uniform over unmasked positions
    m = model(attention=False)
    att = m.reason(m.user_state(NewsRepr(H, None, None), hmask), cand, record=True).attentions
    n = cand.mask.sum(-1, keepdim=True).double()
    assert torch.allclose(att["title"][:, :, 0], cand.mask / n)
    m(H, hmask, cand).sum().backward()
    assert m.W_alpha.weight.grad is None and m.W_beta.weight.grad is None


def test_steps_have_their_own_projection_only():
    m = model()
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.startswith("W_p.") and n.endswith("weight") for n in names) == 3
    assert sum(n.startswith("W_k.") for n in names) == 2  # shared across steps


def test_sigmoid_attention_drops_sum_to_one():
    m = model(query_attention="sigmoid")
    H, hmask, cand = dbl(*inputs(6))
    att = m.reason(m.user_state(NewsRepr(H, None, None), hmask), cand, record=True).attentions
    s = att["title"].sum(-1)
    assert not torch.allclose(s, torch.ones_like(s))
    assert ((att["title"] > 0) == cand.mask[:, :, None, :]).all()


def test_config_validation():
    with pytest.raises(ValueError, match="query_attention"):
        RMBERTConfig(query_attention="relu")
    with pytest.raises(ValueError, match="steps"):
        dataclasses.replace(RMBERTConfig(), steps=0)


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = RMBERT(RMBERTConfig(dim=D, steps=2))
    H, hmask, cand = inputs(7)
    y = (torch.rand(B, C) > 0.5).float()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(H, hmask, cand), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02


@pytest.mark.parametrize(
    "change",
    [
        {},
        *ABLATIONS,
        {"steps": 1},
        {"steps": 5, "memory_dim": 9, "click_hidden": 11},
        {"click_product": True},
        {"click_product": True, "steps": 1, "memory_dim": 9, "click_hidden": 11},
        {"click_product": True, "prev_memory": False},
        {"match_strength": True},
        {"match_strength": True, "click_product": True, "steps": 2},
        {"match_strength": True, "prev_memory": False},
        {"match_strength": True, "attention": False},
        {"similarity": True},
        {"similarity": True, "match_strength": True, "click_product": True, "steps": 2},
        {"similarity": True, "similarity_heads": 3},
    ],
)
def test_folded_inference_equals_the_model(change):
    m = model(**change).eval()
    if m.cfg.similarity:  # heads that differ from the identity
        with torch.no_grad():
            m.S.weight.add_(0.3 * torch.randn_like(m.S.weight))
    H, hmask, cand = dbl(*inputs(8, empty_history_row=1))
    f = m.fold()
    out = m.reason(m.user_state(NewsRepr(H, None, None), hmask), cand, record=True)
    want, att = out.logits, out.attentions
    folded = f.score(H, hmask, cand, f.news_terms(cand), record=True)
    got, att2 = folded.logits, folded.attentions
    assert torch.allclose(got, want, atol=1e-9)
    assert torch.allclose(att2["title"], att["title"], atol=1e-9)
    assert torch.allclose(att2["history"], att["history"], atol=1e-9)


def test_click_product_adds_a_similarity_path():
    """Eq. 8': with P and W_1p zeroed the score is the paper's; otherwise it reads x_n * P m_p."""
    H, hmask, cand = dbl(*inputs(3))
    paper, prod = model(seed=4), model(seed=4, click_product=True)
    prod.load_state_dict(paper.state_dict(), strict=False)
    assert set(prod.state_dict()) - set(paper.state_dict()) == {"P.weight", "P.bias", "W_1p.weight"}
    with torch.no_grad():
        prod.W_1p.weight.zero_()
    assert torch.allclose(prod(H, hmask, cand), paper(H, hmask, cand))
    with torch.no_grad():
        prod.W_1p.weight.normal_()
    x, m = cand.cls, None
    logits = prod.reason(prod.user_state(NewsRepr(H, None, None), hmask), cand).logits
    assert not torch.allclose(logits, paper(H, hmask, cand))
    # the new path is exactly W_1p (x * (P m_p + b_P)) before the ReLU: rebuild it by hand
    state = prod.user_state(NewsRepr(H, None, None), hmask)
    m = prod.m0.expand(B, C, -1)
    for k in prod.query_unit(x, cand.tokens, cand.mask)[0]:
        logits_i = prod.memory_logits_fast(prod.fast_terms(k), m, state)
        m = prod.memory_update(torch.softmax(logits_i.masked_fill(~hmask[:, None], -1e9), -1), m, state)
    pre = prod.W_1(torch.cat([x, m], -1)) + (x * (m @ prod.P.weight.T + prod.P.bias)) @ prod.W_1p.weight.T
    assert torch.allclose(logits, prod.W_2(torch.relu(pre)).squeeze(-1))


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"fast_path": False},
        {"attention": False},
        {"click_product": True},
        {"match_strength": True},
        {"similarity": True},
        {"similarity": True, "similarity_heads": 2},
    ],
)
def test_deduplicated_candidates_score_as_expanded(change):
    """Unique candidates [U, ...] with an index [B, C] give the scores and gradients of the
    expanded [B, C, ...] form: the query unit just runs once per unique news."""
    m = model(**change)
    H, hmask, _ = dbl(*inputs(5))
    g = torch.Generator().manual_seed(6)
    U = 4
    uniq = NewsRepr(
        torch.randn(U, D, generator=g).double(),
        torch.randn(U, L, D, generator=g).double(),
        torch.rand(U, L) > 0.3,
    )
    uniq.mask[:, 0] = True
    idx = torch.randint(0, U, (B, C), generator=g)
    full = NewsRepr(uniq.cls[idx], uniq.tokens[idx], uniq.mask[idx])
    dedup = NewsRepr(uniq.cls, uniq.tokens, uniq.mask, index=idx)
    state = m.user_state(NewsRepr(H, None, None), hmask)
    a, b = m.reason(state, full, record=True), m.reason(state, dedup, record=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-10)
    assert torch.allclose(a.attentions["title"], b.attentions["title"])
    assert torch.allclose(a.attentions["history"], b.attentions["history"])
    ga = torch.autograd.grad(a.logits.sum(), list(m.parameters()), allow_unused=True, retain_graph=True)
    gb = torch.autograd.grad(b.logits.sum(), list(m.parameters()), allow_unused=True)
    for x, y in zip(ga, gb):
        assert (x is None and y is None) or torch.allclose(x, y, atol=1e-9)


def test_match_strength_reads_the_log_sum_exp_of_the_history_logits():
    """Eq. 8'': with W_1s zeroed the score is the model's without it; the term added is W_1s s with
    s_i = log sum_j exp(history logit_ij) over clicked news (0 for an empty history), by hand."""
    H, hmask, cand = dbl(*inputs(11, empty_history_row=2))
    base, strong = model(seed=9), model(seed=9, match_strength=True)
    check_new_path(strong, base, strong.W_1s.weight, (H, hmask, cand), (H, hmask, cand))
    state = strong.user_state(NewsRepr(H, None, None), hmask)
    x, m = cand.cls, strong.m0.expand(B, C, -1)
    hm = hmask[:, None, :].expand(-1, C, -1)
    lses = []
    for k in strong.query_unit(x, cand.tokens, cand.mask)[0]:
        logits = strong.memory_logits_direct(k, m, state)  # the literal form, bias included
        lse = torch.logsumexp(logits.masked_fill(~hm, float("-inf")), -1)
        lses.append(torch.where(hm.any(-1), lse, torch.zeros_like(lse)))
        m = strong.memory_update(torch.softmax(logits.masked_fill(~hm, -1e9), -1) * hm, m, state)
    pre = strong.W_1(torch.cat([x, m], -1)) + strong.W_1s(torch.stack(lses, -1))
    want = strong.W_2(torch.relu(pre)).squeeze(-1)
    assert torch.allclose(strong(H, hmask, cand), want)
    assert torch.all(torch.stack(lses, -1)[2] == 0)  # the empty history


def test_similarity_reads_max_and_mean_cosine_to_clicked_news():
    """Eq. 8''': with W_1c zeroed the score is the model's without it; S starts as the identity, so
    the features are the no-training max and mean cosine of x_n to the clicked news, by hand
    (0 for an empty history); S is trained (it gets a gradient)."""
    H, hmask, cand = dbl(*inputs(12, empty_history_row=1))
    base, sim = model(seed=10), model(seed=10, similarity=True)
    sim.load_state_dict(base.state_dict(), strict=False)
    assert set(sim.state_dict()) - set(base.state_dict()) == {"S.weight", "W_1c.weight"}
    with torch.no_grad():
        sim.W_1c.weight.zero_()
    assert torch.allclose(sim(H, hmask, cand), base(H, hmask, cand))
    feats = []
    for b in range(B):
        for c in range(C):
            h = H[b][hmask[b]]
            cos = torch.nn.functional.cosine_similarity(cand.cls[b, c][None], h, dim=-1)
            feats.append([cos.max(), cos.mean()] if len(h) else [0.0, 0.0])
    want = torch.tensor(feats, dtype=H.dtype).view(B, C, 2)
    state = sim.user_state(NewsRepr(H, None, None), hmask)
    got = sim.similarity_features(sim.metric(cand.cls), state.Hs, hmask)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.all(got[1] == 0)
    with torch.no_grad():
        sim.W_1c.weight.normal_()
    sim(H, hmask, cand).sum().backward()
    assert sim.S.weight.grad is not None and sim.S.weight.grad.abs().sum() > 0


def test_similarity_heads_each_read_their_own_metric():
    """With h heads the click layer reads [max, mean] per head, head-major: every head starts as
    the identity (all equal the one-head features); a head whose metric is set to A reads the
    cosines of A x_n and A h_j."""
    H, hmask, cand = dbl(*inputs(14, empty_history_row=2))
    one, three = model(seed=11, similarity=True), model(seed=11, similarity=True, similarity_heads=3)
    assert three.S.weight.shape == (3 * D, D) and three.W_1c.weight.shape[1] == 6
    s1 = one.user_state(NewsRepr(H, None, None), hmask)
    f1 = one.similarity_features(one.metric(cand.cls), s1.Hs, hmask)  # [B, C, 2]
    s3 = three.user_state(NewsRepr(H, None, None), hmask)
    f3 = three.similarity_features(three.metric(cand.cls), s3.Hs, hmask)  # [B, C, 6]
    assert torch.allclose(f3, f1.repeat(1, 1, 3), atol=1e-12)
    A = torch.randn(D, D, dtype=H.dtype, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        three.S.weight[D : 2 * D] = A
    s3 = three.user_state(NewsRepr(H, None, None), hmask)
    f3 = three.similarity_features(three.metric(cand.cls), s3.Hs, hmask)
    b, c = 0, 1
    h = H[b][hmask[b]] @ A.T
    cos = torch.nn.functional.cosine_similarity((cand.cls[b, c] @ A.T)[None], h, dim=-1)
    assert torch.allclose(f3[b, c, 2:4], torch.stack([cos.max(), cos.mean()]), atol=1e-12)
    assert torch.allclose(f3[..., :2], f1, atol=1e-12) and torch.allclose(f3[..., 4:], f1, atol=1e-12)
    assert torch.all(f3[2] == 0)  # the empty history


def test_similarity_runs_under_fp16_autocast():
    """The masked max fills with -2 (below every cosine), which fp16 holds; -1e9 would overflow."""
    H, hmask, cand = inputs(13, empty_history_row=0)
    m = RMBERT(RMBERTConfig(dim=D, steps=2, similarity=True))
    with torch.autocast("cpu", dtype=torch.float16):
        out = m(H, hmask, cand)
    assert torch.isfinite(out.float()).all()


def match_inputs(seed=16, F=5):
    """Match ids from a small alphabet (0 = none), so that matches happen."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (B, C, F), generator=g), torch.randint(0, 4, (B, M, F), generator=g)


def test_feature_match_counts_exact_overlaps_by_hand():
    """Eq. 8'''': per kind, the share of unmasked clicked news matching the candidate, then
    whether any does; 0 never matches; an empty history gives zeros."""
    cm = torch.tensor([[[1, 2, 5, 6, 0], [1, 3, 0, 0, 0], [0, 0, 0, 0, 0]]])  # [1, 3, 5]
    hm = torch.tensor([[[1, 2, 7, 0, 0], [9, 3, 6, 0, 0], [1, 2, 5, 0, 0], [0, 0, 0, 0, 0]]])  # [1, 4, 5]
    mask = torch.tensor([[True, True, False, True]])  # the third clicked news is padding
    f = RMBERT.match_features(cm, hm, mask)
    third = 1 / 3
    want = torch.tensor(
        [
            [
                [third, third, third, 1.0, 1.0, 1.0],  # category and subcategory of #1, entity 6 of #2
                [third, third, 0.0, 1.0, 1.0, 0.0],  # category of #1, subcategory of #2
                [0.0] * 6,  # nothing known: no match, even against the all-zero clicked news
            ]
        ]
    )
    assert torch.allclose(f, want)
    assert torch.all(RMBERT.match_features(cm, hm, torch.zeros_like(mask)) == 0)
    pad = torch.nn.functional.pad  # more entity slots, unused: only the slots in use are compared
    assert torch.equal(RMBERT.match_features(pad(cm, (0, 3)), pad(hm, (0, 1)), mask), f)
    assert torch.equal(
        RMBERT.match_features(cm[..., :2], hm[..., :2], mask)[..., [0, 1, 3, 4]], f[..., [0, 1, 3, 4]]
    )


def test_feature_match_adds_a_path_and_folds():
    """With W_1f zeroed the score is the model's without the switch; with it, the folded form
    (match ids of candidates in terms["match"], of clicked news in terms["history_match"])
    scores as the model, deduplicated candidates too; missing match ids are an error."""
    H, hmask, cand = dbl(*inputs(17, empty_history_row=1))
    cm, hm = match_inputs()
    base = model(seed=5, similarity=True)
    fm = model(seed=5, similarity=True, feature_match=True)
    fm.load_state_dict(base.state_dict(), strict=False)
    assert set(fm.state_dict()) - set(base.state_dict()) == {"W_1f.weight"}
    assert fm.side_inputs == ("match",) and RMBERT.inputs_for(fm.cfg) == ("match",)
    hist = NewsRepr(H, None, None, extra={"match": hm})
    cand_m = dataclasses.replace(cand, extra={"match": cm})
    with torch.no_grad():
        fm.W_1f.weight.zero_()
    assert torch.allclose(fm(hist, hmask, cand_m), base(H, hmask, cand))
    with torch.no_grad():
        fm.W_1f.weight.normal_()
    fm.eval()
    want = fm.reason(fm.user_state(hist, hmask), cand_m).logits
    assert not torch.allclose(want, base(H, hmask, cand))
    f = fm.fold()
    terms = {**f.news_terms(cand), "match": cm, "history_match": hm}
    assert torch.allclose(f.score(H, hmask, cand, terms).logits, want, atol=1e-9)
    # deduplicated: candidate b, c is unique news b * C + c
    idx = torch.arange(B * C).view(B, C)
    flat = NewsRepr(cand.cls.flatten(0, 1), cand.tokens.flatten(0, 1), cand.mask.flatten(0, 1), idx)
    flat.extra = {"match": cm.flatten(0, 1)}
    assert torch.allclose(fm.reason(fm.user_state(hist, hmask), flat).logits, want, atol=1e-10)
    with pytest.raises(ValueError, match="match"):
        fm(H, hmask, cand)
    with pytest.raises(ValueError, match="match"):
        f.score(H, hmask, cand, f.news_terms(cand))


def test_content_match_is_the_idf_cosine_of_distinct_title_words_by_hand():
    """Eq. 8''''': l_j = sum over shared distinct words of idf^2 / (|c| |h_j|); repeats count
    once, 0 is padding, masked clicked news are left out of the max and the mean."""
    idf = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, 1.0], dtype=torch.float64)  # [V]; id 0 = padding
    ct = torch.tensor([[[1, 2, 2, 0], [5, 0, 0, 0]]])  # [1, 2, 4]: words {1, 2} and {5}
    ht = torch.tensor([[[2, 3, 0], [1, 2, 1], [5, 5, 0], [4, 0, 0]]])  # [1, 4, 3]
    mask = torch.tensor([[True, True, False, True]])  # the third clicked news is padding
    f = RMBERT.lexical_features(ct, ht, mask, idf)  # [1, 2, 2]
    n_c = (1 + 4) ** 0.5  # |{1, 2}|: idf 1 and 2
    cos = torch.tensor(
        [
            [4 / (n_c * (4 + 9) ** 0.5), (1 + 4) / (n_c * n_c), 0.0],  # vs {2, 3}, {1, 2}, {4}
            [0.0, 0.0, 0.0],  # {5} matches only the masked {5}
        ],
        dtype=torch.float64,
    )
    want = torch.stack([cos.amax(-1), cos.sum(-1) / 3], -1)[None]
    assert torch.allclose(f, want)
    assert torch.allclose(f[0, 0, 0], torch.tensor(1.0, dtype=torch.float64))  # the same words: 1
    assert torch.all(RMBERT.lexical_features(ct, ht, torch.zeros_like(mask), idf) == 0)


def test_content_match_entity_relatedness_by_hand():
    """Eq. 8''''': r_j = the largest cosine between an entity of each news, clipped at 0; 0
    where either has no entity with a vector; masked clicked news left out."""
    unit = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.6, 0.8], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    ce = torch.tensor([[[1, 0], [3, 4], [0, 0]]])  # [1, 3, 2]; entity 4 has no vector
    he = torch.tensor([[[2, 0], [3, 1], [1, 0]]])  # [1, 3, 2]
    mask = torch.tensor([[True, True, False]])
    f = RMBERT.entity_features(ce, he, mask, unit)
    r = torch.tensor([[0.6, 1.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)  # [C, M unmasked]
    want = torch.stack([r.amax(-1), r.sum(-1) / 2], -1)[None]
    assert torch.allclose(f, want)
    assert torch.all(RMBERT.entity_features(ce, he, torch.zeros_like(mask), unit) == 0)


def title_inputs(seed=18, V=9, E=3, N=6):
    """Title token ids from a small vocabulary (0 = padding), so that words are shared, and
    entity ids (0 = none) for [B, C] candidates and [B, M] clicked news."""
    g = torch.Generator().manual_seed(seed)
    ct, ht = torch.randint(0, V, (B, C, L), generator=g), torch.randint(0, V, (B, M, L + 2), generator=g)
    return ct, ht, torch.randint(0, N, (B, C, E), generator=g), torch.randint(0, N, (B, M, E), generator=g)


def test_content_match_adds_a_path_fits_its_buffers_and_folds():
    """With W_1n zeroed the score is the model's without the switch; the IDF is fitted on the
    training titles and the entity vectors come from the vocabulary, unit length; the folded
    form (side tables in terms[name] and terms["history_" + name]) scores as the model,
    deduplicated candidates too."""
    from types import SimpleNamespace

    H, hmask, cand = dbl(*inputs(19, empty_history_row=1))
    ct, ht, ce, he = title_inputs()
    base = model(seed=6, similarity=True, feature_match=True)
    lm = model(
        seed=6,
        similarity=True,
        feature_match=True,
        content_match=True,
        vocab_size=9,
        num_entities=6,
        vector_dim=4,
    )
    lm.load_state_dict(base.state_dict(), strict=False)
    assert set(lm.state_dict()) - set(base.state_dict()) == {"W_1n.weight", "idf", "ent_unit"}
    assert lm.side_inputs == ("match", "title_ids", "entity_ids") == RMBERT.inputs_for(lm.cfg)
    titles = torch.tensor([[1, 2, 2, 0], [1, 3, 0, 0], [4, 0, 0, 0]]).numpy()  # 3 training news
    vectors = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    vectors[0] = vectors[5] = 0  # padding, and an entity without a vector
    lm.fit_training_news(SimpleNamespace(vectors=vectors.numpy()), {"title_ids": titles})
    idf = torch.log(torch.tensor(4.0) / (1 + torch.tensor([0, 2, 1, 1, 1, 0, 0, 0, 0]))) + 1
    assert torch.allclose(lm.idf.float(), idf)
    assert torch.allclose(lm.ent_unit[1:5].norm(dim=-1), torch.ones(4, dtype=torch.float64))
    assert torch.all(lm.ent_unit[[0, 5]] == 0)
    cm, hm = match_inputs()
    hist = NewsRepr(H, None, None, extra={"match": hm, "title_ids": ht, "entity_ids": he})
    cand_l = dataclasses.replace(cand, extra={"match": cm, "title_ids": ct, "entity_ids": ce})
    with torch.no_grad():
        lm.W_1n.weight.zero_()
    want0 = base(
        NewsRepr(H, None, None, extra={"match": hm}), hmask, dataclasses.replace(cand, extra={"match": cm})
    )
    assert torch.allclose(lm(hist, hmask, cand_l), want0)
    with torch.no_grad():
        lm.W_1n.weight.normal_()
    lm.eval()
    state = lm.user_state(hist, hmask)
    feats = lm.content_features(ct, ce, state)  # [B, C, 4]
    assert torch.any(feats[..., 2:] > 0) and torch.any(feats[..., :2] > 0)  # both kinds fire
    assert torch.allclose(feats[..., :2], RMBERT.lexical_features(ct, ht, hmask, lm.idf))
    assert torch.allclose(feats[..., 2:], RMBERT.entity_features(ce, he, hmask, lm.ent_unit))
    want = lm.reason(state, cand_l).logits
    assert not torch.allclose(want, want0)
    f = lm.fold()
    assert f.side_tables == ("match", "title_ids", "entity_ids") and f.token_axes["title_ids"] == 1
    side = {"match": cm, "title_ids": ct, "entity_ids": ce}
    terms = {
        **f.news_terms(cand),
        **side,
        "history_match": hm,
        "history_title_ids": ht,
        "history_entity_ids": he,
    }
    assert torch.allclose(f.score(H, hmask, cand, terms).logits, want, atol=1e-9)
    # eq. 8''''' given, as serving's retrieval hands it over (terms["proxy"]): read, not computed
    assert torch.allclose(f.score(H, hmask, cand, {**terms, "proxy": feats}).logits, want, atol=1e-9)
    assert not torch.allclose(f.score(H, hmask, cand, {**terms, "proxy": feats.flip(-1)}).logits, want)
    idx = torch.arange(B * C).view(B, C)
    flat = NewsRepr(cand.cls.flatten(0, 1), cand.tokens.flatten(0, 1), cand.mask.flatten(0, 1), idx)
    flat.extra = {k: v.flatten(0, 1) for k, v in side.items()}
    assert torch.allclose(lm.reason(lm.user_state(hist, hmask), flat).logits, want, atol=1e-10)
    with pytest.raises(ValueError, match="content_match"):
        lm(NewsRepr(H, None, None, extra={"match": hm, "title_ids": ht}), hmask, cand_l)
    with pytest.raises(ValueError, match="entity ids"):
        f.score(H, hmask, cand, {k: v for k, v in terms.items() if k != "history_entity_ids"})
    with pytest.raises(ValueError, match="vocab_size"):
        RMBERT(RMBERTConfig(dim=D, content_match=True))


def test_wide_adds_the_side_features_linearly_to_the_logit_and_folds():
    """Eq. 8w: w_w starts at zero (the model without the switch); the logit then moves by
    w_w . [similarity ; match ; content features]; the folded form scores as the model."""
    H, hmask, cand = dbl(*inputs(21, empty_history_row=2))
    ct, ht, ce, he = title_inputs(22)
    cm, hm = match_inputs(23)
    kw = dict(similarity=True, similarity_heads=2, feature_match=True, content_match=True)
    kw |= dict(vocab_size=9, num_entities=6, vector_dim=4)
    base, wide = model(seed=7, **kw), model(seed=7, wide=True, **kw)
    wide.ent_unit.copy_(torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1))
    base.load_state_dict(wide.state_dict(), strict=False)
    assert set(wide.state_dict()) - set(base.state_dict()) == {"w_w.weight"}
    assert wide.w_w.weight.shape == (1, 4 + 6 + 4) and torch.all(wide.w_w.weight == 0)
    hist = NewsRepr(H, None, None, extra={"match": hm, "title_ids": ht, "entity_ids": he})
    cand_s = dataclasses.replace(cand, extra={"match": cm, "title_ids": ct, "entity_ids": ce})
    wide.eval(), base.eval()
    assert torch.allclose(wide(hist, hmask, cand_s), base(hist, hmask, cand_s))
    with torch.no_grad():
        wide.w_w.weight.normal_()
    state = wide.user_state(hist, hmask)
    f = torch.cat(
        [
            wide.similarity_features(wide.metric(cand.cls), state.Hs, hmask),
            wide.match_features(cm, hm, hmask),
            wide.content_features(ct, ce, state),
        ],
        -1,
    )
    want = base(hist, hmask, cand_s) + f @ wide.w_w.weight[0]
    assert torch.allclose(wide(hist, hmask, cand_s), want)
    fold = wide.fold()
    terms = {**fold.news_terms(cand), "match": cm, "title_ids": ct, "entity_ids": ce}
    terms |= {"history_match": hm, "history_title_ids": ht, "history_entity_ids": he}
    assert torch.allclose(fold.score(H, hmask, cand, terms).logits, want, atol=1e-9)
    with pytest.raises(ValueError, match="wide needs"):
        RMBERT(RMBERTConfig(dim=D, wide=True))


def test_click_concat_off_drops_eq8s_concatenation_and_folds():
    """Eq. 8c: W_1 [x_n ; m_p] is held at zero and never trained (only b_1 is): the scores are
    those of the full model with W_1's weight zeroed, they still depend on the memory through
    eq. 8', and the folded form scores as the model."""
    H, hmask, cand = dbl(*inputs(26, empty_history_row=1))
    cm, hm = match_inputs(27)
    kw = dict(similarity=True, feature_match=True, click_product=True)
    full, nc = model(seed=9, **kw), model(seed=9, click_concat=False, **kw)
    assert torch.all(nc.W_1.weight == 0) and not nc.W_1.weight.requires_grad
    assert nc.W_1.bias.requires_grad
    full.load_state_dict(nc.state_dict())  # the same weights, W_1's zero included
    hist = NewsRepr(H, None, None, extra={"match": hm})
    cand_m = dataclasses.replace(cand, extra={"match": cm})
    nc.eval(), full.eval()
    want = full(hist, hmask, cand_m)
    got = nc(hist, hmask, cand_m)
    assert torch.allclose(got, want)
    with torch.no_grad():
        nc.P.weight.normal_()
    assert not torch.allclose(nc(hist, hmask, cand_m), got)  # the memory reaches the score by eq. 8'
    nc.train()
    nc(hist, hmask, cand_m).sum().backward()
    assert nc.W_1.weight.grad is None and nc.W_1.bias.grad is not None and nc.W_m.weight.grad is not None
    nc.eval()
    f = nc.fold()
    terms = {**f.news_terms(cand), "match": cm, "history_match": hm}
    assert torch.allclose(f.score(H, hmask, cand, terms).logits, nc(hist, hmask, cand_m), atol=1e-9)
    with pytest.raises(ValueError, match="click_concat"):
        RMBERT(RMBERTConfig(dim=D, click_concat=False))


def field_inputs(seed=28, nc=4, ns=5):
    """Category and subcategory ids of candidates [B, C] and clicked news [B, M] (0 = unknown)."""
    g = torch.Generator().manual_seed(seed)
    cand = {
        "category": torch.randint(0, nc, (B, C), generator=g),
        "subcategory": torch.randint(0, ns, (B, C), generator=g),
    }
    hist = {
        "category": torch.randint(0, nc, (B, M), generator=g),
        "subcategory": torch.randint(0, ns, (B, M), generator=g),
    }
    return cand, hist


def test_field_affinity_reads_learned_relations_by_hand():
    """Eq. 8f: per field the max and mean over unmasked clicked news of A[c(n), c(j)], 0 where
    either id is unknown, then the candidate's priors b[c(n)]; an empty history gives zero
    relations but keeps the priors."""
    m = model(click_concat=False, field_affinity=True, num_categories=3, num_subcategories=3)
    with torch.no_grad():
        m.A_c.copy_(torch.tensor([[9.0, 9, 9], [9, 1, -2], [9, 3, 0.5]]))  # row/col 0 never read
        m.A_s.copy_(torch.tensor([[9.0, 9, 9], [9, -1, -4], [9, 2, 0]]))
        m.b_c.copy_(torch.tensor([9.0, 0.25, -0.5]))
        m.b_s.copy_(torch.tensor([9.0, 1.5, 2.5]))
    cf = torch.tensor([[[1, 2], [2, 0]], [[1, 1], [0, 0]]])  # [2 users, 2 candidates, 2 fields]
    hf = torch.tensor([[[1, 1], [2, 2], [0, 1], [2, 1]], [[2, 2], [1, 1], [2, 1], [1, 1]]])  # [2, 4, 2]
    mask = torch.tensor([[True, True, True, False], [False, False, False, False]])  # a padded click
    got = m.affinity_features(cf, hf, mask)
    # user 0, candidate 0: category 1 against 1, 2, unknown -> 1, -2, 0; subcategory 2 against 1, 2, 1 -> 2, 0, 2
    want00 = [1.0, -1 / 3, 2.0, 4 / 3, 0.25, 2.5]
    # candidate 1: category 2 -> 3, 0.5, 0; subcategory unknown -> all 0 and no prior
    want01 = [3.0, 3.5 / 3, 0.0, 0.0, -0.5, 0.0]
    assert torch.allclose(got[0], torch.tensor([want00, want01], dtype=got.dtype))
    assert torch.allclose(got[1], torch.tensor([[0, 0, 0, 0, 0.25, 1.5], [0] * 6], dtype=got.dtype))


def test_field_affinity_adds_a_path_learns_and_folds():
    """With W_1a zeroed the score is the model's without the switch; the relations and priors
    start at zero and get gradients; the folded form (ids in terms, the clicked news' under
    history_) scores as the model, deduplicated candidates too; missing ids are an error."""
    H, hmask, cand = dbl(*inputs(29, empty_history_row=1))
    cids, hids = field_inputs()
    kw = dict(similarity=True, click_product=True)
    base = model(seed=6, **kw)
    fa = model(seed=6, field_affinity=True, num_categories=4, num_subcategories=5, **kw)
    fa.load_state_dict(base.state_dict(), strict=False)
    assert set(fa.state_dict()) - set(base.state_dict()) == {"A_c", "A_s", "b_c", "b_s", "W_1a.weight"}
    assert fa.side_inputs == ("category", "subcategory")
    assert torch.all(fa.A_c == 0) and torch.all(fa.b_s == 0)
    hist = NewsRepr(H, None, None, extra=hids)
    cand_f = dataclasses.replace(cand, extra=cids)
    assert torch.allclose(fa(hist, hmask, cand_f), base(H, hmask, cand))  # zero relations: no change
    fa(hist, hmask, cand_f).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (fa.A_c, fa.A_s, fa.b_c, fa.b_s))
    with torch.no_grad():
        for p in (fa.A_c, fa.A_s, fa.b_c, fa.b_s):
            p.normal_()
    fa.eval()
    want = fa.reason(fa.user_state(hist, hmask), cand_f).logits
    assert not torch.allclose(want, base(H, hmask, cand))
    f = fa.fold()
    terms = {**f.news_terms(cand), **cids, **{"history_" + k: v for k, v in hids.items()}}
    assert torch.allclose(f.score(H, hmask, cand, terms).logits, want, atol=1e-9)
    # eq. 8f given, as serving's retrieval hands it over (terms["proxy"]): read, not computed
    given = fa.affinity_features(f.fields(terms), f.fields(terms, "history_"), hmask)  # [B, C, 6]
    assert torch.allclose(f.score(H, hmask, cand, {**terms, "proxy": given}).logits, want, atol=1e-9)
    assert not torch.allclose(f.score(H, hmask, cand, {**terms, "proxy": given.flip(-1)}).logits, want)
    idx = torch.arange(B * C).view(B, C)
    flat = NewsRepr(cand.cls.flatten(0, 1), cand.tokens.flatten(0, 1), cand.mask.flatten(0, 1), idx)
    flat.extra = {k: v.flatten() for k, v in cids.items()}
    assert torch.allclose(fa.reason(fa.user_state(hist, hmask), flat).logits, want, atol=1e-10)
    with pytest.raises(ValueError, match="field_affinity"):
        fa(H, hmask, cand)
    with pytest.raises(ValueError, match="field_affinity"):
        f.score(H, hmask, cand, f.news_terms(cand))
    with pytest.raises(ValueError, match="num_categories"):
        RMBERT(RMBERTConfig(dim=D, field_affinity=True))
    only = model(click_concat=False, field_affinity=True, num_categories=4, num_subcategories=5)
    assert only(hist, hmask, cand_f).shape == (B, C)  # eq. 8c with eq. 8f alone is a valid model


def test_memory_match_hands_the_click_layer_the_cosine_to_the_memory_and_folds():
    """Eq. 8m: the click layer reads cos(x_n, P m_p + b_P): by hand for a user without clicks
    (m_p from m_0 alone) where it is the click layer's only input; with W_1r zeroed the score is
    the model's without it; the memory then learns through it alone; the folded form scores as
    the model, with eq. 8' (which shares P) too."""
    H, hmask, cand = dbl(*inputs(31, empty_history_row=1))
    only = model(seed=8, click_concat=False, memory_match=True)
    m = only.m0
    for _ in range(only.cfg.steps):  # eq. 7 with U = 0
        m = only.W_m(torch.cat([m, torch.zeros_like(m)]))
    r = torch.nn.functional.cosine_similarity(cand.cls[1], only.P(m).expand(C, -1), dim=-1)  # [C]
    want = only.W_2(torch.relu(only.W_1.bias + r[:, None] * only.W_1r.weight[:, 0])).squeeze(-1)
    assert torch.allclose(only(H, hmask, cand)[1], want)
    only(H, hmask, cand).sum().backward()
    assert (
        only.W_m.weight.grad.abs().sum() > 0 and only.W_beta.weight.grad.abs().sum() > 0
    )  # the memory learns
    assert only.W_1.weight.grad is None
    base = model(seed=7, similarity=True)
    mm = model(seed=7, similarity=True, memory_match=True)
    assert set(mm.state_dict()) - set(base.state_dict()) == {"P.weight", "P.bias", "W_1r.weight"}
    check_new_path(mm, base, mm.W_1r.weight, (H, hmask, cand), (H, hmask, cand))
    for m in (mm, only, model(seed=9, memory_match=True, click_product=True)):
        m.eval()
        f = m.fold()
        assert torch.allclose(
            f.score(H, hmask, cand, f.news_terms(cand)).logits, m(H, hmask, cand), atol=1e-9
        )

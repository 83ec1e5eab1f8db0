"""RMBERT's folded inference form: the same function as `RMBERT` in eval mode, with every
product that depends on the news alone or on the user alone hoisted out of the candidate loop.

Shape letters as in `rmbert.py`: B users, C candidates, M history, L title tokens, D hidden,
Dm memory, H1 the click layer's width, p steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rmbert.models.base import InferenceForm, masked_logsumexp, masked_mean_weights, masked_softmax
from rmbert.models.rmbert import RMBERT, bag_norm
from rmbert.types import NewsRepr, Scores


@dataclass
class FoldedUser:
    """Candidate-independent terms of one request's user, computed once (see FoldedRMBERT)."""

    mask: torch.Tensor  # [B, M] bool
    Gt: torch.Tensor  # [B, D, M] = (W_H H + b_H)^T: (left * r) -> the G part of the history logits
    Ht: torch.Tensor  # [B, D, M] = H^T: right -> the H part
    P: torch.Tensor  # [B, (p-1) M, D]: r_t = rho_t + [b_0 .. b_(t-1)] @ P[:, -tM:]
    Q: torch.Tensor  # [B, p M, H1]: W_1m m_p = kappa + [b_0 .. b_(p-1)] @ Q
    Y: torch.Tensor | None  # [B, p M, D]: P m_p + b_P = y0 + [b_0 .. b_(p-1)] @ Y (click_product)
    Hs: torch.Tensor | None = None  # [B, M, h, D]: unit S h_j per metric head (similarity)
    match: torch.Tensor | None = None  # [B, M, F]: clicked news' match ids (feature_match)
    words: torch.Tensor | None = None  # [B, M, L]: clicked news' title token ids (content_match)
    ents: torch.Tensor | None = None  # [B, M, E]: clicked news' entity ids (content_match)
    fields: torch.Tensor | None = None  # [B, M, 2]: clicked news' category, subcategory ids (field_affinity)


class FoldedRMBERT(InferenceForm):
    """RMBERT for inference, with every product that depends on the news alone or on the user
    alone hoisted out of the candidate loop. The same function as `RMBERT` in eval mode (equal
    up to float rounding; tested). With s_t = sum_l a_tl X_l the title pooling of step t, so
    that k_t = W_q s_t + b_q, and v_t = w_b * k_t:

    * Query (eq. 1-3) depends on the news alone: its title weights a_t and poolings s_t are
      news terms, computed once per news. The logits of step t are X (w_a * kq_t) + b_a with
      kq_t = [news part] + W_k2 k_(t-1), and W_k2 k_(t-1) = s_(t-1) R_1 + c_1.
    * History logits (eq. 4-6). w_b . (~I_j * k_t) = (l_t * r_t) . G_j + u_t . H_j + const,
      with per-news l_t = s_t R_2 + c_2 and u_t = s_t R_3 + c_3 (`left`, `right`), r_t = W_r
      m_(t-1) + b_r and G = W_H H + b_H. The constant, v_t . b_I + b_b = s_t . g + h, cancels
      in the softmax; `gate` keeps it for eq. 8''.
    * Memory (eq. 7) is linear: m_t = A^t m_0 + sum_(i<t) A^(t-1-i) (W_m2 U_i + b_m) with
      A = W_m1 and U_i = b_i H. So r_t = rho_t + sum_(i<t) b_i P_(t-1-i) and W_1m m_p =
      kappa + sum_i b_i Q_(p-1-i), with per-user P_k = H (W_r A^k W_m2)^T and Q_k = H (W_1m
      A^k W_m2)^T: neither m nor U is ever formed. With `click_product`, P m_p + b_P = y0 +
      sum_i b_i Y_(p-1-i) in the same way, with Y_k = H (P A^k W_m2)^T, and eq. 8' adds
      W_1p (x_n * that) per candidate (D H1 more multiply-adds).

    Per (user, candidate) pair at p steps that is (2p + p (p-1) / 2) M D + p M H1 multiply-adds
    and no D x D product (about 26 M D at p = 4 with eq. 8m and four metric heads, against
    about 37 D^2 unfolded), plus one [M, D] x [D, p (D + H1)] product per user (p D more
    columns with eq. 8' or 8m); per news, about p (3 D^2 + 2 L D) once: offline in serving's
    index, once per split in evaluation (`NewsRecModel.split_terms`).
    """

    # the per-news terms (`news_terms`), each with its number of trailing title-token axes:
    #   title [..., p, L]  the title weights a_t of each step (the query unit, eq. 1-3)
    #   left, right [..., p, D]  l_t = s_t R_2 + c_2 and u_t = s_t R_3 + c_3 (eq. 4-6)
    #   gate [..., p]     s_t . g + h, the history logits' constant (match_strength, eq. 8'')
    #   click [..., H1]   W_1x x_n + b_1, the news part of eq. 8
    #   sim  [..., h, D]  unit S x_n per metric head (similarity, eq. 8''')
    #   match [..., F]    the news's match ids, a side table that serving builds (feature_match, eq. 8'''')
    #   title_ids [..., L] the news's title token ids, and
    #   entity_ids [..., E] its entity ids, likewise (content_match, eq. 8''''')
    #   category, subcategory [...] its feature-vocabulary ids, likewise (field_affinity, eq. 8f)
    token_axes = {"title": 1, "left": 0, "right": 0, "click": 0}
    candidate_tokens = False  # `score` reads the candidates' news terms, never their title tokens
    record_terms = ("title",)  # read only for the attentions that `record` returns

    def __init__(self, m: RMBERT) -> None:
        cfg = m.cfg
        D, p = cfg.dim, cfg.steps
        self.cfg, self.p, self.D = cfg, p, D
        dtype = m.m0.dtype
        f64 = {n: t.detach().double() for n, t in m.state_dict().items()}
        W_k1, W_k2, wb = f64["W_k.weight"][:, :D], f64["W_k.weight"][:, D:], f64["W_beta.weight"][0]
        W_q, b_q = f64["W_q.weight"], f64["W_q.bias"]
        # the linear maps of k_t = W_q s_t + b_q (row vectors): W_k2 k_t, W_I1^T v_t, W_I2^T v_t
        maps = [W_k2.T, wb[:, None] * f64["W_I.weight"][:, :D], wb[:, None] * f64["W_I.weight"][:, D:]]
        (R1, R2, R3), (c1, c2, c3) = [W_q.T @ R for R in maps], [b_q @ R for R in maps]
        self.R1w = (R1 * f64["W_alpha.weight"][0]).to(dtype)  # R_1 diag(w_a)
        self.c1, self.R2, self.c2 = c1.to(dtype), R2.to(dtype), c2.to(dtype)
        self.R3, self.c3 = R3.to(dtype), c3.to(dtype)
        # news part of kq_t: W_k1 (W_p^t x + b_p^t) + b_k (+ W_k2 x at t = 0, k_0 = x_n)
        Wq = [W_k1 @ f64[f"W_p.{t}.weight"] for t in range(p)]
        if cfg.prev_query:
            Wq[0] = Wq[0] + W_k2
        self.Wq = torch.stack(Wq).to(dtype)  # [p, D, D]
        self.bq = torch.stack([W_k1 @ f64[f"W_p.{t}.bias"] + f64["W_k.bias"] for t in range(p)]).to(dtype)
        self.w_a, self.b_a = m.W_alpha.weight[0], m.W_alpha.bias
        # the memory recursion unrolled: constants rho_t, kappa and maps T_k, S_k
        Dm = m.m0.shape[0]
        A, W_m2, b_m = f64["W_m.weight"][:, :Dm], f64["W_m.weight"][:, Dm:], f64["W_m.bias"]
        W_r, b_r, W_1m = f64["W_r.weight"], f64["W_r.bias"], f64["W_1.weight"][:, D:]
        mem, Ak_W = f64["m0"], W_m2  # m_t with U = 0, and A^k W_m2
        rho, T, S, Yk = [], [], [], []
        Pm = f64["P.weight"] if cfg.click_product or cfg.memory_match else None
        for k in range(p):
            rho.append(W_r @ mem + b_r)
            mem = A @ mem + b_m
            if k < p - 1:
                T.append(W_r @ Ak_W)
            S.append(W_1m @ Ak_W)
            if Pm is not None:
                Yk.append(Pm @ Ak_W)
            Ak_W = A @ Ak_W
        self.rho, self.kappa = torch.stack(rho).to(dtype), (W_1m @ mem).to(dtype)  # [p, D], [H1]
        self.y0 = (Pm @ mem + f64["P.bias"]).to(dtype) if Pm is not None else None  # [D]
        self.W_1p = m.W_1p.weight if cfg.click_product else None  # [H1, D]
        self.W_1r = m.W_1r.weight[:, 0] if cfg.memory_match else None  # [H1], eq. 8m
        # eq. 8'': the history logits' constant v_t . b_I + b_b (it cancels in the softmax, not in the
        # log-sum-exp) is s_t . g + h with k_t = W_q s_t + b_q
        self.W_1s = m.W_1s.weight if cfg.match_strength else None  # [H1, p]
        if cfg.match_strength:
            self.token_axes = {**self.token_axes, "gate": 0}
        wbI = wb * f64["W_I.bias"]
        self.g, self.h = (W_q.T @ wbI).to(dtype), (b_q @ wbI + f64["W_beta.bias"][0]).to(dtype)
        if not cfg.prev_memory:
            self.rho = torch.ones_like(self.rho)  # eq. 4 without m: I = W_H H + b_H
        self.r0 = self.rho[0]
        # one map for every per-user product: H -> [G, P_(p-2) .. P_0, Q_(p-1) .. Q_0 (, Y)], stacked
        # oldest-first so that b_0 .. b_t pair with P_t .. P_0 and b_0 .. b_(p-1) with Q_(p-1) .. Q_0
        self.U = torch.cat([f64["W_H.weight"], *T[::-1], *S[::-1], *Yk[::-1]], 0).T.to(dtype)  # [D, .]
        self.b_H = m.W_H.bias
        self.W_1x, self.b_1 = m.W_1.weight[:, :D], m.W_1.bias
        self.W_2, self.b_2 = m.W_2.weight[0], m.W_2.bias
        self._init_side_paths(m)

    def _init_side_paths(self, m: RMBERT) -> None:
        """The click layer's side paths (eq. 8''' to 8f, 8w), read from m."""
        cfg = m.cfg
        self.S = m.S.weight if cfg.similarity else None  # [h D, D]
        self.W_1c = m.W_1c.weight if cfg.similarity else None  # [H1, 2h]
        if cfg.similarity:
            self.token_axes = {**self.token_axes, "sim": 0}
        self.W_1f = m.W_1f.weight if cfg.feature_match else None  # [H1, 2K]
        self.side_tables = m.inputs_for(cfg)
        self.token_axes = {**self.token_axes, **{k: int(k == "title_ids") for k in self.side_tables}}
        self.W_1n = m.W_1n.weight if cfg.content_match else None  # [H1, 4]
        self.content_features = m.content_features  # reads m's IDF and entity-vector buffers
        self._content_pairs = m.content_proxy  # eq. 8''''' for one user's clicks, all unmasked
        self.proxy_tables = ("title_ids", "entity_ids", "title_norm") * cfg.content_match + (
            "category",
            "subcategory",
        ) * cfg.field_affinity
        self.idf = m.idf if cfg.content_match else None
        self.content_proxy = self.proxy_features if self.proxy_tables else None  # for retrieval
        self.content_columns = 4 * cfg.content_match  # eq. 8''''', alone: `proxy_features(content_only=True)`
        self.affinity_features = m.affinity_features if cfg.field_affinity else None  # reads A, b
        self._affinity_pairs = m.affinity_proxy  # eq. 8f for one user's clicks, all unmasked
        self.W_1a = m.W_1a.weight if cfg.field_affinity else None  # [H1, 6]
        self.w_w = m.w_w.weight[0] if cfg.wide else None  # [2h + 6 + 4 + 6], eq. 8w
        # eq. 8''' to 8f as one product: their weights side by side [H1, 2h + 6 + 4 + 6] (those on)
        on = [w for w in (self.W_1c, self.W_1f, self.W_1n, self.W_1a) if w is not None]
        self.W_side = torch.cat(on, 1).detach() if on else None

    def metric(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> unit S x per metric head [..., h, D]."""
        h = self.cfg.similarity_heads
        return torch.nn.functional.normalize((x @ self.S.T).unflatten(-1, (h, -1)), dim=-1)

    @torch.no_grad()
    def news_terms(self, news: NewsRepr) -> dict[str, torch.Tensor]:
        """News cls [..., D], tokens [..., L, D] and mask [..., L] -> the terms above: the whole
        query unit (eq. 1-3), which depends on the news alone."""
        x, X, xmask = news.cls, news.tokens, news.mask
        if X is None or xmask is None:
            raise ValueError("RMBERT's news terms need the news's title tokens and their mask")
        cfg = self.cfg
        kq = torch.einsum("...d,ted->...te", x, self.Wq) + self.bq  # [..., p, D], news part of eq. 2
        if cfg.prev_query:
            kq[..., 1:, :] += self.c1  # W_k2 k_(t-1) = s_(t-1) R_1 + c_1
        base = (kq * self.w_a) @ X.transpose(-1, -2) + self.b_a  # [..., p, L]
        a = masked_mean_weights(xmask, X.dtype)  # w/o Att: mean pooling at every step
        title, pooled = [], []
        for t in range(self.p):
            if cfg.attention:
                logits = base[..., t, :]  # [..., L]
                if cfg.prev_query and t > 0:  # + X (w_a * s_(t-1) R_1)
                    logits = logits + (X @ (pooled[-1] @ self.R1w)[..., None]).squeeze(-1)
                if cfg.query_attention == "softmax":
                    a = masked_softmax(logits, xmask)
                else:
                    a = torch.sigmoid(logits) * xmask
            title.append(a)
            pooled.append((a[..., None, :] @ X).squeeze(-2))  # s_t [..., D]
        s = torch.stack(pooled, -2)  # [..., p, D]
        terms = {
            "title": torch.stack(title, -2),
            "left": s @ self.R2 + self.c2,
            "right": s @ self.R3 + self.c3,
            "click": x @ self.W_1x.T + self.b_1,
        }
        if self.W_1s is not None:
            terms["gate"] = s @ self.g + self.h  # [..., p]
        if self.S is not None:
            terms["sim"] = self.metric(x)
        return terms

    @torch.no_grad()
    def click_terms(self, x: torch.Tensor, norms: bool = True) -> dict[str, torch.Tensor]:
        """News vectors x [n, D] -> the products of x as a click that `user_state` would compute
        on every request, for the serving index to hold per news: "click_map" x U [n, W] and,
        with similarity, "click_scale" [n, h], the norm of S x per metric head, so that
        S x = "sim" * "click_scale". norms=False: "click_sim" S x [n, h, D] itself instead (for
        a table added to the clicks, e.g. recency embeddings: both maps are linear in x)."""
        out = {"click_map": x @ self.U}
        if self.S is not None:
            Sx = (x @ self.S.T).unflatten(-1, (self.cfg.similarity_heads, -1))  # [n, h, D]
            out |= {"click_scale": Sx.norm(dim=-1)} if norms else {"click_sim": Sx}
        return out

    @torch.no_grad()
    def user_state(
        self,
        H: torch.Tensor,
        mask: torch.Tensor,
        match: torch.Tensor | None = None,
        words: torch.Tensor | None = None,
        ents: torch.Tensor | None = None,
        fields: torch.Tensor | None = None,
        clicks: dict[str, torch.Tensor] | None = None,
    ) -> FoldedUser:
        """H [B, M, D] (clicked news vectors), their match ids [B, M, F] (feature_match), title
        token ids [B, M, L] and entity ids [B, M, E] (content_match), category and subcategory
        ids [B, M, 2] (field_affinity) -> FoldedUser. clicks: H's products precomputed, read
        instead of computed: "click_map" H U [B, M, W] and "click_sim" S H [B, M, h, D]
        (`click_terms` with norms=False, of H's rows)."""
        B, M, D = H.shape
        p, H1 = self.p, self.kappa.shape[0]
        clicks = clicks or {}
        # [B, M, D + (p-1) D + p H1 (+ p D)], of the clicks alone: a padded slot never gets weight
        full = bool(mask.all())  # no padded slot (one user): the given products read as they are
        if "click_map" in clicks and full:
            HU = clicks["click_map"]
        else:
            HU = H.new_zeros(B, M, self.U.shape[1])
            HU[mask] = clicks["click_map"][mask] if "click_map" in clicks else H[mask] @ self.U
        G = HU[..., :D] + self.b_H  # [B, M, D]
        P = HU[..., D : p * D].reshape(B, M, p - 1, D).transpose(1, 2).reshape(B, -1, D)
        q_end = p * D + p * H1
        Q = HU[..., p * D : q_end].reshape(B, M, p, H1).transpose(1, 2).reshape(B, -1, H1)
        Y = None
        if self.y0 is not None:
            Y = HU[..., q_end:].reshape(B, M, p, D).transpose(1, 2).reshape(B, -1, D)
        Hs = None
        if self.S is not None:
            if "click_sim" in clicks and full:
                Hs = torch.nn.functional.normalize(clicks["click_sim"], dim=-1)
            else:
                Hs = H.new_zeros(B, M, self.cfg.similarity_heads, D)
                if "click_sim" in clicks:
                    Hs[mask] = torch.nn.functional.normalize(clicks["click_sim"][mask], dim=-1)
                else:
                    Hs[mask] = self.metric(H[mask])
        if self.W_1f is not None and match is None:
            raise ValueError("rmbert.feature_match needs the clicked news' match ids")
        if self.W_1n is not None and (words is None or ents is None):
            raise ValueError("rmbert.content_match needs the clicked news' title token ids and entity ids")
        if self.W_1a is not None and fields is None:
            raise ValueError("rmbert.field_affinity needs the clicked news' category and subcategory ids")
        return FoldedUser(mask, G.transpose(1, 2), H.transpose(1, 2), P, Q, Y, Hs, match, words, ents, fields)

    @torch.no_grad()
    def score(
        self, H: torch.Tensor, mask: torch.Tensor, cand: NewsRepr, terms: dict, record: bool = False
    ) -> Scores:
        """H [B, M, D], mask [B, M] -> Scores, as RMBERT.reason in eval mode."""
        side = [terms.get("history_" + k) for k in ("match", "title_ids", "entity_ids")]
        clicks = {k: terms["history_" + k] for k in ("click_map", "click_sim") if "history_" + k in terms}
        user = self.user_state(H, mask, *side, fields=self.fields(terms, "history_"), clicks=clicks)
        return self.score_user(user, cand, terms, record)

    def fields(self, terms: dict, prefix: str = "") -> torch.Tensor | None:
        """The category and subcategory ids [..., 2] among `terms` (field_affinity), else None."""
        if self.W_1a is None or prefix + "category" not in terms:
            return None
        return torch.stack([terms[prefix + "category"], terms[prefix + "subcategory"]], -1)

    @torch.no_grad()
    def table_terms(self, tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """content_match: "title_norm" [n], each title's `bag_norm`, which the proxy's lexical
        cosines divide by (computed once per news instead of per request)."""
        if self.idf is None or "title_ids" not in tables:
            return {}
        return {"title_norm": bag_norm(tables["title_ids"], self.idf)}

    @torch.no_grad()
    def proxy_features(
        self, cand: dict, clicks: dict, content_only: bool = False, content: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The retrieval proxy's features from the model's side paths for G news of one user
        with M clicks, all unmasked: the `proxy_tables` rows of the news (cand) and of the clicks
        -> [G, 4] (eq. 8''''', content_match), then [G, 6] (eq. 8f, field_affinity), as the click
        layer reads them; content_only: the [G, 4] of eq. 8''''' alone; content: those [G, 4],
        already computed (content_only), read instead."""
        out = []
        if self.cfg.content_match and content is not None:
            out.append(content)
        elif self.cfg.content_match:
            names = ("title_ids", "entity_ids")
            pairs = self._content_pairs(
                *(cand[k] for k in names), *(clicks[k] for k in names), cand.get("title_norm")
            )
            out.append(pairs)
            if content_only:
                return pairs
        if self.W_1a is not None:
            affinity = self._affinity_pairs(self.fields(cand), self.fields(clicks))  # [G, 6]
            out.append(affinity.to(out[0].dtype if out else torch.float32))
        return torch.cat(out, -1)

    @torch.no_grad()
    def score_user(self, user: FoldedUser, cand: NewsRepr, terms: dict, record: bool = False) -> Scores:
        """Logits [B, C] (and per-step weights if record) for a folded user, from the candidates'
        news terms [B, C, ...]. cand.cls (x_n [B, C, D]) is read only with `click_product` or
        `memory_match`; the candidates' title tokens never."""
        cfg, p = self.cfg, self.p
        left, right = terms["left"], terms["right"]  # [B, C, p, D]
        B, C, M = *left.shape[:2], user.mask.shape[1]
        hmask = user.mask[:, None, :].expand(-1, C, -1)  # [B, C, M]
        r = self.r0  # W_r m_(t-1) + b_r: [D] until it depends on the candidate
        bw = left.new_empty(B, C, p * M)  # history weights of every step, [b_0 .. b_(p-1)]
        strength = []
        # right_t H^T of every step in one product [B, C, p, M]; while r is the same for every
        # candidate (r_0), (left_t * r) G^T = left_t (r G^T) needs no [B, C, D] product (200
        # candidates, 4 steps: 1.9 -> 1.3 ms)
        RH = (right.flatten(1, 2) @ user.Ht).view(B, C, p, M) if cfg.attention else None
        for t in range(p):
            if RH is None:
                b = masked_mean_weights(hmask, left.dtype)
                hl = None
            else:
                if r.dim() == 1:
                    hl = left[..., t, :] @ (r[:, None] * user.Gt) + RH[..., t, :]  # [B, C, M]
                else:
                    hl = (left[..., t, :] * r) @ user.Gt + RH[..., t, :]
                b = masked_softmax(hl, hmask)
            if self.W_1s is not None:
                lse = masked_logsumexp(hl + terms["gate"][..., t, None], hmask) if hl is not None else None
                strength.append(lse if lse is not None else left.new_zeros(B, C))
            bw[..., t * M : (t + 1) * M] = b
            if cfg.attention and cfg.prev_memory and t + 1 < p:
                r = self.rho[t + 1] + bw[..., : (t + 1) * M] @ user.P[:, (p - 2 - t) * M :]  # [B, C, D]
        logits = self.click(user, cand, terms, bw, strength)
        if record:
            return Scores(logits, {"title": terms["title"], "history": bw.view(B, C, p, M)})
        return Scores(logits)

    def click(self, user: FoldedUser, cand: NewsRepr, terms: dict, bw: torch.Tensor, strength: list):
        """Eq. 8 and its options, from the history weights of every step bw [B, C, p M] ->
        logits [B, C]."""
        pre = terms["click"] + self.kappa + bw @ user.Q  # (8), [B, C, H1]
        if self.y0 is not None and user.Y is not None:
            y = self.y0 + bw @ user.Y  # P m_p + b_P, [B, C, D]
            if self.W_1p is not None:
                pre = pre + (cand.cls * y) @ self.W_1p.T  # (8')
            if self.W_1r is not None:
                pre = pre + torch.nn.functional.cosine_similarity(cand.cls, y, dim=-1)[..., None] * self.W_1r
        if self.W_1s is not None:
            pre = pre + torch.stack(strength, -1) @ self.W_1s.T  # (8'')
        side = []  # the side features of eq. 8''' to 8f, in W_side's order (and for eq. 8w)
        if self.W_1c is not None:
            side.append(RMBERT.similarity_features(terms["sim"], user.Hs, user.mask))  # (8''')
        if self.W_1f is not None:
            side.append(RMBERT.match_features(terms["match"], user.match, user.mask).to(pre.dtype))  # (8'''')
        # the retrieval's `proxy_features` of these candidates: eq. 8''''' [4] then eq. 8f [6], each where on
        given = terms.get("proxy")
        if self.W_1n is not None:
            if given is not None:
                side.append(given[..., :4].to(pre.dtype))
            else:
                side.append(
                    self.content_features(terms["title_ids"], terms["entity_ids"], user).to(pre.dtype)
                )  # (8''''')
        if self.W_1a is not None:
            if given is not None:
                side.append(given[..., -6:].to(pre.dtype))
            else:
                side.append(
                    self.affinity_features(self.fields(terms), user.fields, user.mask).to(pre.dtype)
                )  # (8f)
        features = torch.cat(side, -1) if side else None  # [B, C, 2h + 6 + 4 + 6], those on
        if features is not None:  # one product, not one per path (200 candidates: 0.21 -> 0.08 ms)
            pre = pre + features @ self.W_side.T
        logits = torch.relu(pre) @ self.W_2 + self.b_2
        if self.w_w is not None:
            logits = logits + features @ self.w_w  # (8w)
        return logits

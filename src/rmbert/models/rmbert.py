"""RMBERT: a recurrent reasoning memory network over BERT news vectors (Jia et al., SIGIR 2021).

Shape letters: B users, C candidates, M history items, L title tokens, D hidden, Dm memory.
Inputs: x_n = candidate [CLS] [B, C, D]; X_con = candidate title tokens [B, C, L, D];
H = clicked news [CLS] vectors [B, M, D]. For step i = 1..p (parameters shared, except W_p^i):

    q_i  = W_p^i x_n + b_p^i                                        (1)
    kq_i = W_k [q_i ; k_{i-1}] + b_k                                (2)
    k_i  = W_q sum_j attn_j(w_a . (kq_i * X_j) + b_a) X_j + b_q     (3)
    I_i  = (W_r m_{i-1} + b_r) * (W_H H + b_H)                      (4)
    ~I_i = W_I [I_i ; H] + b_I                                      (5)
    U_i  = sum_j softmax_j(w_b . (~I_ij * k_i) + b_b) H_j           (6)
    m_i  = W_m [m_{i-1} ; U_i] + b_m                                (7)
    logit = W_2 ReLU(W_1 [x_n ; m_p] + b_1) + b_2                   (8)

with k_0 = x_n and m_0 a learned vector. Option `click_product` (not in the paper) adds a
similarity path to the click predictor, as DIN-style matchers do, so that how well the candidate
matches what the memory retrieved reaches the score without the MLP relearning a product:

    o = ReLU(W_1 [x_n ; m_p] + W_1p (x_n * (P m_p + b_P)) + b_1)   (8')
 `memory_logits_direct` computes (4)-(6) literally
([B, C, M, D] tensors); `memory_logits_fast` is the exact fast path: with v = w_b * k_i,
W_I = [W_I1 W_I2], r = W_r m_{i-1} + b_r and G = W_H H + b_H (per user, computed once),

    w_b . (~I_ij * k_i) = ((W_I1^T v) * r) . G_j + (W_I2^T v) . H_j + v . b_I

which costs O(D^2 + M D) per candidate and step instead of O(M D^2).

Masking: padded title tokens and history slots never get attention. An empty history gives
U_i = 0 at every step, so the memory evolves from m_0 alone and the score is a
candidate-only prior (x_n through the click predictor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rmbert.encoders.bert import NewsRepr
from rmbert.models.base import NEG, Recommender, masked_mean_weights, masked_softmax


@dataclass(frozen=True)
class RMBERTConfig:
    dim: int = 384  # D: the news encoder's hidden size (set from the encoder)
    memory_dim: int = 0  # Dm (0 = D)
    steps: int = 4  # p, the number of reasoning memory cells
    click_hidden: int = 0  # width of o in (8) (0 = D)
    query_attention: str = "softmax"  # softmax | sigmoid (the paper's text drops the sum-to-one)
    prev_query: bool = True  # False: w/o PQ, eq. 2 without k_{i-1}
    prev_memory: bool = True  # False: w/o PM, eq. 4 without m_{i-1}
    attention: bool = True  # False: w/o Att, both attentions -> masked mean pooling
    fast_path: bool = True  # exact fast path for eq. 4-6 (False: the direct form)
    dropout: float = 0.0  # on x_n, X_con and H
    click_product: bool = False  # eq. 8': the product x_n * P m_p inside the click predictor

    def __post_init__(self) -> None:
        if self.query_attention not in ("softmax", "sigmoid"):
            raise ValueError(f"query_attention must be softmax or sigmoid, not {self.query_attention!r}")
        if self.steps < 1:
            raise ValueError("steps (p) must be at least 1")


@dataclass
class UserState:
    H: torch.Tensor  # [B, M, D] clicked news vectors
    mask: torch.Tensor  # [B, M] bool
    GH: torch.Tensor  # [B, M, 2D] = [W_H H + b_H ; H]


class RMBERT(Recommender):
    name = "rmbert"

    def __init__(self, cfg: RMBERTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        Dm = cfg.memory_dim or D
        self.W_p = nn.ModuleList([nn.Linear(D, D) for _ in range(cfg.steps)])  # (1), one per step
        self.W_k = nn.Linear(2 * D, D)  # (2)
        self.W_alpha = nn.Linear(D, 1)  # (3) attention over title tokens
        self.W_q = nn.Linear(D, D)  # (3)
        self.W_r = nn.Linear(Dm, D)  # (4)
        self.W_H = nn.Linear(D, D)  # (4)
        self.W_I = nn.Linear(2 * D, D)  # (5)
        self.W_beta = nn.Linear(D, 1)  # (6) attention over history
        self.W_m = nn.Linear(Dm + D, Dm)  # (7)
        self.m0 = nn.Parameter(torch.randn(Dm) * 0.02)  # m_0, randomly initialised
        H1 = cfg.click_hidden or D
        self.W_1 = nn.Linear(D + Dm, H1)  # (8)
        self.W_2 = nn.Linear(H1, 1)  # (8)
        if cfg.click_product:
            self.P = nn.Linear(Dm, D)  # (8')
            self.W_1p = nn.Linear(D, H1, bias=False)  # (8')
        self.drop = nn.Dropout(cfg.dropout)

    def user_state(
        self, hist: NewsRepr, hist_mask: torch.Tensor, users: torch.Tensor | None = None
    ) -> UserState:
        H = self.drop(hist.cls)  # [B, M, D]
        G = self.W_H(H)  # [B, M, D]
        return UserState(H=H, mask=hist_mask, GH=torch.cat([G, H], dim=-1))

    # -- eq. 1-3: the query unit --------------------------------------------------------------
    def query_step(
        self, i: int, x: torch.Tensor, k: torch.Tensor, X: torch.Tensor, xmask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, k: [B, C, D]; X: [B, C, L, D]; xmask [B, C, L] -> k_i [B, C, D], weights [B, C, L]."""
        q = self.W_p[i](x)  # (1) [B, C, D]
        k_prev = k if self.cfg.prev_query else torch.zeros_like(k)
        kq = self.W_k(torch.cat([q, k_prev], dim=-1))  # (2) [B, C, D]
        if not self.cfg.attention:
            a = masked_mean_weights(xmask, X.dtype)
        else:
            # w_a . (kq * X_j) = (w_a * kq) . X_j: one batched mat-vec, no [B, C, L, D] product
            logits = torch.einsum("bcld,bcd->bcl", X, kq * self.W_alpha.weight[0]) + self.W_alpha.bias
            if self.cfg.query_attention == "softmax":
                a = masked_softmax(logits, xmask)
            else:
                a = torch.sigmoid(logits) * xmask
        k_new = self.W_q(torch.einsum("bcl,bcld->bcd", a, X))  # (3) [B, C, D]
        return k_new, a

    # -- eq. 4-6: the memory unit, attention logits over history ---------------------------------
    def memory_logits_direct(self, k: torch.Tensor, m: torch.Tensor, state: UserState) -> torch.Tensor:
        """The literal form: materialises I_i and ~I_i, [B, C, M, D]. Returns logits [B, C, M]."""
        H, G = state.H, state.GH[..., : self.cfg.dim]  # [B, M, D]
        C = k.shape[1]
        if self.cfg.prev_memory:
            r = self.W_r(m)  # [B, C, D]
            I = r[:, :, None, :] * G[:, None, :, :]  # (4) [B, C, M, D]
        else:
            I = G[:, None, :, :].expand(-1, C, -1, -1)
        I_t = self.W_I(torch.cat([I, H[:, None].expand(-1, C, -1, -1)], dim=-1))  # (5) [B, C, M, D]
        return self.W_beta(I_t * k[:, :, None, :]).squeeze(-1)  # [B, C, M]

    def memory_logits_fast(self, k: torch.Tensor, m: torch.Tensor, state: UserState) -> torch.Tensor:
        """The exact fast path: O(D^2 + M D) per candidate and step. Returns logits [B, C, M]."""
        D = self.cfg.dim
        v = k * self.W_beta.weight[0]  # [B, C, D]
        W_I1, W_I2 = self.W_I.weight[:, :D], self.W_I.weight[:, D:]  # [D, D] each
        left = v @ W_I1  # [B, C, D] = W_I1^T v
        if self.cfg.prev_memory:
            left = left * self.W_r(m)
        lhs = torch.cat([left, v @ W_I2], dim=-1)  # [B, C, 2D]
        s = torch.einsum("bce,bme->bcm", lhs, state.GH)  # [B, C, M]
        return s + (v @ self.W_I.bias)[..., None] + self.W_beta.bias

    def memory_step(
        self, k: torch.Tensor, m: torch.Tensor, state: UserState, C: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> m_i [B, C, Dm] and history weights [B, C, M]."""
        hmask = state.mask[:, None, :].expand(-1, C, -1)  # [B, C, M]
        if not self.cfg.attention:
            b = masked_mean_weights(hmask, state.H.dtype)
        else:
            memory_logits = self.memory_logits_fast if self.cfg.fast_path else self.memory_logits_direct
            b = masked_softmax(memory_logits(k, m, state), hmask)
        U = torch.einsum("bcm,bmd->bcd", b, state.H)  # (6) [B, C, D]
        return self.W_m(torch.cat([m, U], dim=-1)), b  # (7)

    def reason(self, state: UserState, cand: NewsRepr, record: bool = False):
        """Run the p cells. Returns logits [B, C] and, if record, per-step title and history weights."""
        x = self.drop(cand.cls)  # [B, C, D]
        X = self.drop(cand.tokens)  # [B, C, L, D]
        B, C, _ = x.shape
        k = x  # k_0 = x_n
        m = self.m0.expand(B, C, -1)  # m_0
        title_w, hist_w = [], []
        for i in range(self.cfg.steps):
            k, a = self.query_step(i, x, k, X, cand.mask)
            m, b = self.memory_step(k, m, state, C)
            if record:
                title_w.append(a)
                hist_w.append(b)
        pre = self.W_1(torch.cat([x, m], dim=-1))  # (8) [B, C, H1]
        if self.cfg.click_product:
            pre = pre + self.W_1p(x * self.P(m))  # (8')
        logits = self.W_2(torch.relu(pre)).squeeze(-1)  # [B, C]
        if record:
            return logits, {"title": torch.stack(title_w, 2), "history": torch.stack(hist_w, 2)}
        return logits, None

    def score_candidates(self, state: UserState, cand: NewsRepr) -> torch.Tensor:
        return self.reason(state, cand)[0]

    @torch.no_grad()
    def fold(self) -> FoldedRMBERT:
        """An inference-only copy with the weights folded for serving (see FoldedRMBERT)."""
        return FoldedRMBERT(self)


@dataclass
class NewsTerms:
    """User-independent terms of a candidate, computed once per news (see FoldedRMBERT)."""

    base: torch.Tensor  # [..., p, L]: title-attention logits of each step, news part
    K: torch.Tensor  # [..., L, L]: the previous step's title weights -> this step's logits
    click: torch.Tensor  # [..., H1]: W_1x x_n + b_1, the news part of eq. 8


@dataclass
class FoldedUser:
    """Candidate-independent terms of one request's user, computed once (see FoldedRMBERT)."""

    mask: torch.Tensor  # [B, M] bool
    Z0: torch.Tensor  # [B, D, M]: s -> history logits in steps where r is constant
    z0: torch.Tensor  # [B, M]
    Gt: torch.Tensor  # [B, D, M] = (W_H H + b_H)^T: left * r -> history logits (other steps)
    Z: torch.Tensor  # [B, D, M]: s -> the H part of those logits
    z: torch.Tensor  # [B, M]
    P: torch.Tensor  # [B, (p-1) M, D]: r_t = rho_t + [b_0 .. b_(t-1)] @ P[:, -tM:]
    Q: torch.Tensor  # [B, p M, H1]: W_1m m_p = kappa + [b_0 .. b_(p-1)] @ Q
    Y: torch.Tensor | None  # [B, p M, D]: P m_p + b_P = y0 + [b_0 .. b_(p-1)] @ Y (click_product)


class FoldedRMBERT:
    """RMBERT for inference, with every product that depends on the news alone or on the user
    alone hoisted out of the candidate loop. The same function as `RMBERT` in eval mode (equal
    up to float rounding; tested). With s_t = sum_l a_tl X_l the title pooling of step t, so
    that k_t = W_q s_t + b_q, and v_t = w_b * k_t:

    * Query (eq. 1-3). The logits of step t are X (w_a * kq_t) + b_a with kq_t = [news part]
      + W_k2 k_(t-1), and W_k2 k_(t-1) = s_(t-1) R_1 + c_1 is linear in a_(t-1). So logits_t =
      base_t + a_(t-1) K with per-news base_t [L] and K = X R_1 diag(w_a) X^T [L, L]:
      the query unit never touches a D x D matrix at request time.
    * History logits (eq. 4-6). w_b . (~I_j * k_t) = (s_t R_2 + c_2) * r_t . G_j + (s_t R_3 +
      c_3) . H_j + const, with r_t = W_r m_(t-1) + b_r and G = W_H H + b_H (the constant,
      v . b_I + b_b, cancels in the softmax). The H part is the per-user map Z = R_3 H^T
      [D, M]; where r is constant (step 1, or w/o PM) the whole map is per user: Z0.
    * Memory (eq. 7) is linear: m_t = A^t m_0 + sum_(i<t) A^(t-1-i) (W_m2 U_i + b_m) with
      A = W_m1 and U_i = b_i H. So r_t = rho_t + sum_(i<t) b_i P_(t-1-i) and W_1m m_p =
      kappa + sum_i b_i Q_(p-1-i), with per-user P_k = H (W_r A^k W_m2)^T and Q_k = H (W_1m
      A^k W_m2)^T: neither m nor U is ever formed. With `click_product`, P m_p + b_P = y0 +
      sum_i b_i Y_(p-1-i) in the same way, with Y_k = H (P A^k W_m2)^T, and eq. 8' adds
      W_1p (x_n * that) per candidate (D H1 more multiply-adds).

    Per candidate at p = 4 that is 3 D^2 + 4 L D + 4 L^2 + 17 M D multiply-adds (the fast path:
    about 37 D^2), plus 10 M D^2 once per user; per news, L D^2 + L^2 D once, offline.
    """

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
        self.c1, self.R2, self.c2, self.c3 = c1.to(dtype), R2.to(dtype), c2.to(dtype), c3.to(dtype)
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
        Pm = f64["P.weight"] if cfg.click_product else None
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
        if not cfg.prev_memory:
            self.rho = torch.ones_like(self.rho)  # eq. 4 without m: I = W_H H + b_H
        self.r0 = self.rho[0]
        # one map for every per-user product: H -> [G, Z, P_(p-2) .. P_0, Q_(p-1) .. Q_0], stacked
        # oldest-first so that b_0 .. b_t pair with P_t .. P_0 and b_0 .. b_(p-1) with Q_(p-1) .. Q_0
        self.U = torch.cat([f64["W_H.weight"], R3, *T[::-1], *S[::-1], *Yk[::-1]], 0).T.to(dtype)  # [D, .]
        self.b_H = m.W_H.bias
        self.W_1x, self.b_1 = m.W_1.weight[:, :D], m.W_1.bias
        self.W_2, self.b_2 = m.W_2.weight[0], m.W_2.bias

    @torch.no_grad()
    def news_terms(self, news: NewsRepr) -> NewsTerms:
        """News cls [..., D], tokens [..., L, D] -> NewsTerms; depends on the news only."""
        x, X = news.cls, news.tokens
        kq = torch.einsum("...d,ted->...te", x, self.Wq) + self.bq  # [..., p, D], news part of eq. 2
        if self.cfg.prev_query:
            kq[..., 1:, :] += self.c1  # W_k2 k_(t-1) = s_(t-1) R_1 + c_1
        base = (kq * self.w_a) @ X.transpose(-1, -2) + self.b_a  # [..., p, L]
        K = (X @ self.R1w) @ X.transpose(-1, -2)  # [..., L, L]
        return NewsTerms(base=base, K=K, click=x @ self.W_1x.T + self.b_1)

    @torch.no_grad()
    def user_state(self, H: torch.Tensor, mask: torch.Tensor) -> FoldedUser:
        """H [B, M, D] (clicked news vectors) -> FoldedUser."""
        B, M, D = H.shape
        p, H1 = self.p, self.kappa.shape[0]
        HU = H @ self.U  # [B, M, 2D + (p-1) D + p H1]
        G, Z = HU[..., :D] + self.b_H, HU[..., D : 2 * D].transpose(1, 2)  # [B, M, D], [B, D, M]
        z = H @ self.c3  # [B, M]
        Z0 = ((G * self.r0) @ self.R2.T).transpose(1, 2) + Z  # [B, D, M]
        z0 = G @ (self.c2 * self.r0) + z
        P = HU[..., 2 * D : (p + 1) * D].reshape(B, M, p - 1, D).transpose(1, 2).reshape(B, -1, D)
        q_end = (p + 1) * D + p * H1
        Q = HU[..., (p + 1) * D : q_end].reshape(B, M, p, H1).transpose(1, 2).reshape(B, -1, H1)
        Y = None
        if self.y0 is not None:
            Y = HU[..., q_end:].reshape(B, M, p, D).transpose(1, 2).reshape(B, -1, D)
        return FoldedUser(mask, Z0, z0, G.transpose(1, 2), Z, z, P, Q, Y)

    @torch.no_grad()
    def score(self, user: FoldedUser, cand: NewsRepr, terms: NewsTerms, record: bool = False):
        """Logits [B, C] (and per-step weights if record), as RMBERT.reason in eval mode.
        cand.cls (x_n [B, C, D]) is read only with `click_product`."""
        cfg, p = self.cfg, self.p
        X, xmask = cand.tokens, cand.mask  # [B, C, L, D], [B, C, L]
        B, C, M = *X.shape[:2], user.mask.shape[1]
        hmask = user.mask[:, None, :].expand(-1, C, -1)  # [B, C, M]
        r = self.r0  # W_r m_(t-1) + b_r: [D] until it depends on the candidate
        a = masked_mean_weights(xmask, X.dtype)  # w/o Att: mean pooling at every step
        bw = X.new_empty(B, C, p * M)  # history weights of every step, [b_0 .. b_(p-1)]
        title_w = []
        for t in range(p):
            if cfg.attention:
                logits = terms.base[..., t, :]  # [B, C, L]
                if cfg.prev_query and t > 0:
                    logits = logits + (a[..., None, :] @ terms.K).squeeze(-2)
                if cfg.query_attention == "softmax":
                    a = masked_softmax(logits, xmask)
                else:
                    a = torch.sigmoid(logits) * xmask
            s = (a[..., None, :] @ X).squeeze(-2)  # [B, C, D]: k_t = W_q s + b_q
            if not cfg.attention:
                b = masked_mean_weights(hmask, X.dtype)
            elif cfg.prev_memory and t > 0:  # r_t depends on the candidate
                left = (s @ self.R2 + self.c2) * r  # [B, C, D]
                b = masked_softmax((left @ user.Gt).add_(s @ user.Z).add_(user.z[:, None]), hmask)
            else:
                b = masked_softmax(s @ user.Z0 + user.z0[:, None], hmask)
            bw[..., t * M : (t + 1) * M] = b
            if cfg.attention and cfg.prev_memory and t + 1 < p:
                r = self.rho[t + 1] + bw[..., : (t + 1) * M] @ user.P[:, (p - 2 - t) * M :]  # [B, C, D]
            if record:
                title_w.append(a)
        pre = terms.click + self.kappa + bw @ user.Q  # (8), [B, C, H1]
        if self.y0 is not None and user.Y is not None:
            pre = pre + (cand.cls * (self.y0 + bw @ user.Y)) @ self.W_1p.T  # (8')
        logits = torch.relu(pre) @ self.W_2 + self.b_2
        if record:
            return logits, {"title": torch.stack(title_w, 2), "history": bw.view(B, C, p, M)}
        return logits


__all__ = ["RMBERT", "RMBERTConfig", "UserState", "FoldedRMBERT", "FoldedUser", "NewsTerms", "NEG"]

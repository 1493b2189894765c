"""DHA's closed-form head fusion for one layer: the least-squares optimum of fusing a group of heads.

The DHA paper (Chen et al. 2024) learns its fusion weights during continued pretraining; here the
fit is solved in closed form from calibration statistics, and every per-member map a linear map can
keep is folded into the neighbouring projections (values into o_proj, keys into q_proj), so nothing
is lost that the fused layer could still express. Identical heads fuse exactly.

Everything is computed from C = E[x xᵀ] over the calibration tokens, x = [attention input, 1]
(the 1 carries the biases), so a fit costs nothing per token. Head h of a projection is the
(d, D+1) block W^h (weights and bias). The query head i reads KV head g(i).

Values, a group S fused into one head:
    R_j R_jᵀ = Σ_{i: g(i)=j} W_o^iᵀ W_o^i           (weights the error by how it reaches the output)
    Y = [X W_v^jᵀ R_j]_{j∈S};  P = top-d eigenvectors of YᵀY, in d×d blocks P_j
    W_v^f = Σ_j P_jᵀ R_jᵀ W_v^j;  M_j = P_jᵀ R_j⁻¹, so X W_v^jᵀ ≈ X W_v^fᵀ M_j;  W_o^i ← W_o^i M_jᵀ

Keys, per RoPE pair t (rows t and t + d/2 as one complex row b_j^t = w_j^t + i·w_j^{t+d/2}):
    z_j = X b_j^t ∈ ℂ^N;  Z = [ω_j z_j]_{j∈S};  v = top eigenvector of ZᴴZ
    b_f^t = Σ_j v_j ω_j b_j^t;  c_j = conj(v_j) / ω_j, so z_j ≈ c_j z_f;  q_i^t ← q_i^t · conj(c_j)
HF's rotary embedding pairs coordinates t and t + d/2 (rotate-half), so RoPE multiplies each such
pair, as one complex number, by e^{iθ_t·pos}. A complex scale commutes with that rotation, and
Re(q · conj(c_j z_f)) = Re((q · conj(c_j)) · conj(z_f)): the fold into the queries is exact.
With a + ib = v_j ω_j, rows t and t + d/2 of the fused key are Σ_j (a w_j^t − b w_j^{t+d/2}) and
Σ_j (a w_j^{t+d/2} + b w_j^t); folding α + iβ = conj(c_j) into query row pair (t, t + d/2) gives
(α·row_t − β·row_{t+d/2}, α·row_{t+d/2} + β·row_t).

ω_j^t is the query energy of pair t over the query heads reading j, times s_j, the spread of
those heads' value outputs through o_proj: a logit error δℓ moves the output by about
δℓ·s_j, so key errors and value errors are both in units of output energy and can share a budget.

Keys of a source with per-head q/k norms (Qwen3), which divide each head's query and key by its own
RMS over head_dim before RoPE (weights g_q, g, shared by the heads):
    n_j = g ⊙ u_j / r_j,  u_j = W_k^j x,  r_j = rms(u_j), a factor of each token and head
The normalised key is not linear in x, but it is in x̃ = x / σ(x) wherever r_j ≈ a_j·σ(x): with
σ² the mean of r_j² over the layer's KV heads and a_j² = E[r_j²/σ²], n_j ≈ b̃_j x̃ with rows
b̃_j = diag(g) W_k^j / a_j. The fit above runs on these rows and C̃ = E[x̃ x̃ᵀ], with ω from
the normalised queries' own energy, so z̃_j = X̃ b̃_j^t ≈ c_j z̃_f as before. The fused head is
a key head like the source's, with the same k_norm: its pre-norm rows are W_k^f = diag(1/g)·b̃_f,
so that g ⊙ n(W_k^f x) = b̃_f x / ρ, ρ = rms(W_k^f x); ρ/σ is about β, β² = tr(W_k^f C̃ W_k^fᵀ)/d,
and c_j ← β·c_j takes up the mean. The free scale of each pair of b̃_f is fixed so that the members
average in phase (b̃_f ← b̃_f · e^{−iθ} / Σ_j |v_j ω_j|, θ the phase of the largest v_j ω_j:
a complex sum could cancel): identical heads then fuse exactly, with c_j = 1 and β = 1. The complex scales still
commute with RoPE, but no longer fold into q_proj, since q_norm divides by the query's RMS after
q_proj: each query head carries them after its norm (DHA's ``q_pair_scale``, ``dha_query_scale``).
"""

from dataclasses import dataclass
from itertools import combinations

import torch

EPS = 1e-8


def augmented(weight: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """(heads·d, D) weight and optional bias -> (heads, d, D+1) float64 blocks."""
    w = weight.double().view(heads, -1, weight.shape[1])
    b = torch.zeros(*w.shape[:2], 1, dtype=torch.float64) if bias is None else bias.double().view(heads, -1, 1)
    return torch.cat([w, b], dim=2)


@dataclass
class NormedKeys:
    """What the fit needs of a source with per-head q/k norms, measured on calibration text: C̃ = E[x̃ x̃ᵀ]
    with x̃ = x/σ(x), each KV head's a_j (KV,), k_norm's weight g (d,), and each query head's energy per
    dimension after q_norm (H, d)."""

    moment: torch.Tensor
    alpha: torch.Tensor
    gain: torch.Tensor
    query_energy: torch.Tensor


class LayerFusion:
    """Fit errors and fused weights of one layer's K and V heads, from the calibration second moment C."""

    def __init__(self, q, k, v, o_weight, second_moment: torch.Tensor, reads: list[int],
                 normed: NormedKeys | None = None, norm_weights: dict[str, torch.Tensor] | None = None):
        """q: (H, d, D+1), k and v: (KV, d, D+1), o_weight: (D, H·d), reads[i] = g(i); ``normed`` for a
        source with q/k norms (the module docstring), whose norm tensors ``norm_weights`` the fused layer keeps."""
        self.normed = normed
        self.norm_weights = norm_weights or {}
        self.q, self.k, self.v = q, k, v
        self.heads, self.d, self.width = q.shape
        self.kv = k.shape[0]
        self.half = self.d // 2
        self.reads = reads
        self.o = o_weight.double().view(o_weight.shape[0], self.heads, self.d)  # (D, H, d)
        C = second_moment.double()
        readers = [[i for i in range(self.heads) if reads[i] == j] for j in range(self.kv)]

        # values: R_j and the Gram matrix of all A_j = W_v^jᵀ R_j
        self.R = []
        for j in range(self.kv):
            m = sum(self.o[:, i].T @ self.o[:, i] for i in readers[j])
            m = m + EPS * (m.trace() / self.d + 1) * torch.eye(self.d, dtype=torch.float64)
            self.R.append(torch.linalg.cholesky(m))
        A = torch.cat([self.v[j].T @ self.R[j] for j in range(self.kv)], dim=1)  # (D+1, KV·d)
        self.value_gram = A.T @ C @ A

        # keys: complex rows per RoPE pair, their Gram matrices, and the weights ω_j^t·s_j
        if normed is None:
            rows, key_moment = k, C
            query_energy = torch.einsum("htd,de,hte->ht", q, C, q)  # (H, d): E[q_t²]
        else:  # the normalised keys' rows b̃_j = diag(g) W_k^j / a_j, on C̃
            rows = k * normed.gain.double()[None, :, None] / normed.alpha.double()[:, None, None]
            key_moment, query_energy = normed.moment.double(), normed.query_energy.double()
        self.key_moment = key_moment
        self.key_rows = torch.complex(rows[:, : self.half], rows[:, self.half :])  # (KV, d/2, D+1)
        Cc = key_moment.to(torch.complex128)
        self.key_gram = torch.einsum("jtd,de,kte->tjk", self.key_rows.conj(), Cc, self.key_rows)  # (d/2, KV, KV)
        pair_energy = query_energy[:, : self.half] + query_energy[:, self.half :]  # (H, d/2)
        mean = C[:, -1]
        cov = C - torch.outer(mean, mean)
        weights = []
        for j in range(self.kv):
            # s_j²: E||W_o^i (v_j − E v_j)||² / d, averaged over the readers i of j
            spread = torch.stack([((self.o[:, i] @ self.v[j]) @ cov * (self.o[:, i] @ self.v[j])).sum()
                                  for i in readers[j]]).mean() / self.d
            omega = pair_energy[readers[j]].mean(0).sqrt()
            weights.append(omega * spread.clamp_min(0).sqrt())
        self.key_weights = torch.stack(weights).clamp_min(EPS)  # (KV, d/2)
        self._cache: dict = {}

    # ---- errors, in units of output energy per token ----

    def value_error(self, group: tuple[int, ...]) -> float:
        if len(group) == 1:
            return 0.0
        key = ("v", group)
        if key not in self._cache:
            idx = torch.cat([torch.arange(j * self.d, (j + 1) * self.d) for j in group])
            eig = torch.linalg.eigvalsh(self.value_gram[idx][:, idx])
            self._cache[key] = eig[: -self.d].clamp_min(0).sum().item()
        return self._cache[key]

    def _key_hermitian(self, group: tuple[int, ...]) -> torch.Tensor:
        idx = torch.tensor(group)
        w = self.key_weights[idx].T.to(torch.complex128)  # (d/2, |S|)
        return w[:, :, None] * self.key_gram[:, idx][:, :, idx] * w[:, None, :]

    def key_error(self, group: tuple[int, ...]) -> float:
        if len(group) == 1:
            return 0.0
        key = ("k", group)
        if key not in self._cache:
            eig = torch.linalg.eigvalsh(self._key_hermitian(group))  # (d/2, |S|), ascending
            self._cache[key] = (eig[:, :-1].clamp_min(0).sum() / (2 * self.d)).item()
        return self._cache[key]

    def key_energy(self, group) -> float:
        return (self._key_hermitian(tuple(group)).diagonal(dim1=1, dim2=2).real.sum() / (2 * self.d)).item()

    def value_energy(self, group) -> float:
        return sum(self.value_gram[j * self.d : (j + 1) * self.d, j * self.d : (j + 1) * self.d].trace().item()
                   for j in group)

    # ---- fused weights ----

    @staticmethod
    def _unfitted(group: tuple[int, ...], mean: bool, weights: torch.Tensor, unit: torch.Tensor):
        """A group that needs no fit: a lone head as it is, or (``mean``) its members' mean (GQA's pooling)."""
        if len(group) == 1:
            return weights[group[0]], {group[0]: unit}
        if mean:
            return torch.stack([weights[j] for j in group]).mean(0), {j: unit for j in group}
        return None

    def fuse_values(self, group: tuple[int, ...], mean: bool = False):
        """(W_v^f (d, D+1), {j: M_j (d, d)}) with X W_v^jᵀ ≈ X W_v^fᵀ M_j."""
        unfitted = self._unfitted(group, mean, self.v, torch.eye(self.d, dtype=torch.float64))
        if unfitted is not None:
            return unfitted
        idx = torch.cat([torch.arange(j * self.d, (j + 1) * self.d) for j in group])
        _, vectors = torch.linalg.eigh(self.value_gram[idx][:, idx])
        top = vectors[:, -self.d :]  # P: (|S|·d, d)
        fused = sum(top[n * self.d : (n + 1) * self.d].T @ self.R[j].T @ self.v[j] for n, j in enumerate(group))
        maps = {j: top[n * self.d : (n + 1) * self.d].T @ torch.linalg.inv(self.R[j]) for n, j in enumerate(group)}
        return fused, maps

    def fuse_keys(self, group: tuple[int, ...], mean: bool = False):
        """(W_k^f (d, D+1), {j: c_j (d/2,) complex}) with z_j ≈ c_j z_f for every RoPE pair."""
        unfitted = self._unfitted(group, mean, self.k, torch.ones(self.half, dtype=torch.complex128))
        if unfitted is not None:
            return unfitted
        _, vectors = torch.linalg.eigh(self._key_hermitian(group))
        top = vectors[:, :, -1]  # (d/2, |S|): v per pair
        idx = torch.tensor(group)
        w = self.key_weights[idx].T.to(torch.complex128)  # (d/2, |S|)
        coef = top * w  # v_j ω_j
        if self.normed is not None:  # the members in phase, at their own scale (identical heads: exact)
            largest = coef.gather(1, coef.abs().argmax(1, keepdim=True))[:, 0]
            phase = largest.conj() / largest.abs().clamp_min(EPS)  # conj(the largest member's phase)
            coef = coef * (phase / coef.abs().sum(1).clamp_min(EPS))[:, None]
        fused = torch.einsum("ts,std->td", coef, self.key_rows[idx])  # (d/2, D+1) complex
        scales = {j: top[:, n].conj() / w[:, n] for n, j in enumerate(group)}
        if self.normed is None:
            return torch.cat([fused.real, fused.imag]), scales
        return self._normed_key(fused, {j: scales[j] * (top[:, n] * w[:, n] / coef[:, n]) for n, j in enumerate(group)})

    def _normed_key(self, fused: torch.Tensor, scales: dict):
        """The fused head's pre-norm rows W_k^f = diag(1/g)·b̃_f, and each member's scale times β."""
        gain = self.normed.gain.double()
        gain = torch.where(gain.abs() < EPS, torch.full_like(gain, EPS), gain)
        weight = torch.cat([fused.real, fused.imag]) / gain[:, None]  # (d, D+1)
        beta = (torch.einsum("td,de,te->", weight, self.key_moment, weight) / self.d).clamp_min(EPS).sqrt()
        return weight, {j: s * beta for j, s in scales.items()}

    def fold_query(self, head: int, scale: torch.Tensor) -> torch.Tensor:
        """Query head ``head``'s (d, D+1) block with every RoPE pair multiplied by conj(scale)."""
        rows = torch.complex(self.q[head, : self.half], self.q[head, self.half :]) * scale.conj()[:, None]
        return torch.cat([rows.real, rows.imag])


def agglomerate(count: int, error, target: int) -> dict[int, list[tuple[int, ...]]]:
    """Merges the pair of groups whose merge adds the least fit error until ``target`` groups remain;
    returns the grouping at every count passed through, from ``count`` down to ``target``."""
    groups = [(j,) for j in range(count)]
    history = {count: list(groups)}
    while len(groups) > target:
        a, b = min(combinations(groups, 2), key=lambda p: error(tuple(sorted(p[0] + p[1]))) - error(p[0]) - error(p[1]))
        groups = sorted([g for g in groups if g not in (a, b)] + [tuple(sorted(a + b))])
        history[len(groups)] = groups
    return history


def equal_groups(count: int, size: int, error) -> list[tuple[int, ...]]:
    """``count // size`` groups of ``size`` heads each, grown greedily around the lowest free head."""
    free, groups = list(range(count)), []
    while free:
        group = (free.pop(0),)
        while len(group) < size:
            best = min(free, key=lambda j: error(tuple(sorted(group + (j,)))))
            free.remove(best)
            group = tuple(sorted(group + (best,)))
        groups.append(group)
    return groups

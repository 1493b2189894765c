"""MLA's closed-form conversion of one attention layer: the weights of a DeepSeek multi-head latent
attention (q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj) fitted to a LLaMA layer.

Notation as in dha_fusion: x (D) is the attention input of a calibration token and C = E[x xᵀ]
(x augmented with a 1, so that means and biases ride along; rehead refuses biases, so the last
column of every weight is 0); W_q^i, W_k^j, W_v^j are head blocks (d, D+1); W_o^i the o_proj
columns of query head i; g(i) the KV head that head i reads. A RoPE pair t (rows t and t + d/2,
HF's rotate-half) is one complex row b^t = w^t + i·w^{t+d/2}, rotated by e^{iθ_t·pos},
θ_t = base^(−2t/d); the logit of the pair is Re(q^t·conj(k^t)·e^{iθ_t(n−m)}) / √d.

MLA caches, per token, a latent c = A x (rank r) and one RoPE key of R dims shared by every head;
head i's position-free key and its value are up-projected from c (kv_b_proj).

The shared RoPE key. DeepSeek's rotary embedding has R/2 pairs with θ'_k = base'^(−2k/R): with
base' = base^(R/d) they are the source's first R/2 pairs, θ'_k = θ_k (the highest frequencies, the
ones that most need their rotation). Per kept pair t < R/2 the KV heads' keys are fused into one,
DHA's key fusion with a single group (dha_fusion.LayerFusion.fuse_keys): z_j^t ≈ c_j^t z_f^t, and
c_j^t folds into the query, q_i^t ← q_i^t·conj(c_g(i)^t) — exact under RoPE.

The position-free part. What the RoPE key cannot hold — the residuals ρ_j^t = b_j^t − c_j^t b_f^t
of the kept pairs and the whole of every other pair, ρ_j^t = b_j^t — is served without rotation:
Re(q^t conj(ρ^t x) e^{iθ_tΔ}) ≈ Re(q^t β_i^t conj(ρ^t x)), with the least-squares constant
β_i^t = E[e^{iθ_tΔ}], Δ = n − m drawn from head i's own attention on calibration text (≈ 1 for a
slow pair, ≈ 0 for a fast one, whose residual then costs what dropping it would). β folds into
the position-free query rows of head i, q̃_i^t = q_i^t β_i^t.

The latent. The position-free keys ρ_j and the values W_v^j of every KV head share one latent,
fitted on the calibration moments with each error weighted as it reaches the attention output:
    values:  R_j R_jᵀ = Σ_{i: g(i)=j} W_o^iᵀ W_o^i                       (as DHA's value fusion)
    keys:    L_j L_jᵀ = Σ_{i: g(i)=j} (S_i / d)·E[q̃_i q̃_iᵀ],  S_i = E‖W_o^i (v_j − E v_j)‖²
(a logit error δℓ moves the head's output by about δℓ·spread: DHA's key weight, as a matrix);
    M = [L_jᵀ ρ_j ; R_jᵀ W_v^j]_j,  G = M C Mᵀ,  P = top-r eigenvectors of G   (reduced-rank regression)
    A = Pᵀ M;  ρ_j x ≈ L_j⁻ᵀ P_j^k c,  W_v^j x ≈ R_j⁻ᵀ P_j^v c.
kv_b_proj of head i is [L_g(i)⁻ᵀ P_g(i)^k ; R_g(i)⁻ᵀ P_g(i)^v], o_proj is the source's. With
x whitened by C this is the activation-aware SVD (CARE, SVD-LLM-V2): it keeps what the tokens use.

kv_a_layernorm, made linear. DeepSeek normalises the latent: y = γ ⊙ u / √(mean(u²) + ε), ε = 1e-6.
With u = s·c and γ = √ε / s, y = c / √(1 + s²·mean(c²)/ε): choosing s so that
s²·max_n mean(c_n²) = NORM_LINEARITY·ε over the calibration tokens leaves y = c to a relative
1 − 1/√(1 + NORM_LINEARITY) ≈ 5e-6 on them (rehead.json's plan: norm_linear_to); a held-out token
whose latent is k times larger in mean square deviates k times more.

Query scale: DeepSeek divides the logit by √(qk_nope + qk_rope) = √(d + R), the source by √d;
every query row is multiplied by √((d + R) / d).

DHA's solution, inside the format. Where it fits (``dha_fits``: R = d, so that DHA's one fused key
is the shared RoPE key, and r ≥ d, so that its fused value heads fit in the latent), DHA's solution
is itself a latent basis P (``dha_basis``): its fused value heads, the key residuals dropped as DHA
drops them, and any rank left over fitted on top. Every orthonormal P is scored by the same objective,
the share 1 − tr(Pᵀ G P) / tr(G) of weighted energy it leaves out (``basis_error``), and the top-r
eigenvectors maximise tr(Pᵀ G P): the fit is never worse than DHA's solution on it, whatever the
layer (the plan records both shares). Keeping DHA's layer where its output on the calibration tokens
was closer to the source layer's was measured and not kept: it made held-out text worse
(BENCHMARKS.md, "MLA against DHA").

Identity: an MQA source (one KV head) at R = d and r = d keeps every pair rotated, its single key
exactly (no residual), and its d value dims in the latent: the source's function, to the norm's bound.
"""

import math
from dataclasses import dataclass

import torch

from .dha_fusion import EPS, LayerFusion, agglomerate

NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm(kv_lora_rank) takes no eps from the config
NORM_LINEARITY = 1e-5  # s²·max mean(c²) / ε on calibration tokens
NORM_BOUND = 1 - 1 / math.sqrt(1 + NORM_LINEARITY)  # the norm's largest relative deviation from linear on them


def rope_base(base: float, head_dim: int, rope_dim: int) -> float:
    """The rope_theta whose DeepSeek frequencies base'^(−2k/R), k < R/2, are the source's first R/2."""
    return base ** (rope_dim / head_dim)


def inverse_frequencies(base: float, head_dim: int) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rotation_means(probs: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """β_i^t = E_n Σ_m a_i(n, m)·e^{iθ_t(n−m)} from attention probabilities (B, H, L, L): (H, d/2) complex."""
    positions = torch.arange(probs.shape[-1], dtype=torch.float64)
    phase = torch.polar(torch.ones(len(positions), len(inv_freq), dtype=torch.float64), positions[:, None] * inv_freq)
    reached = probs.to(torch.complex128) @ phase.conj()  # Σ_m a(n, m) e^{−iθm}: (B, H, L, d/2)
    return (reached * phase).mean(dim=(0, 2))


def causal_probabilities(q: torch.Tensor, k: torch.Tensor, repeats: int) -> torch.Tensor:
    """softmax(q kᵀ / √d) under the causal mask; q (B, H, L, d) and k (B, KV, L, d) already rotated."""
    k = k.repeat_interleave(repeats, dim=1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).triu(1)
    return logits.masked_fill(mask, float("-inf")).softmax(-1)


@dataclass
class MLAWeights:
    """One layer's DeepSeek attention tensors (float64) and what the latent's rank leaves out."""

    q_proj: torch.Tensor  # (H·(d + R), D): per head [position-free (d); RoPE (R), interleaved]
    kv_a_proj_with_mqa: torch.Tensor  # (r + R, D): [latent (r); shared RoPE key (R), interleaved]
    kv_a_layernorm: torch.Tensor  # (r,)
    kv_b_proj: torch.Tensor  # (H·(d + d), r): per head [position-free key (d); value (d)]
    o_proj: torch.Tensor  # (D, H·d)
    latent_error: float  # the weighted share of position-free key and value energy the rank leaves out


def interleave(pairs: torch.Tensor) -> torch.Tensor:
    """(P, W) complex rows -> (2P, W) real rows in DeepSeek's interleaved order: Re, Im of each pair."""
    return torch.stack([pairs.real, pairs.imag], dim=1).flatten(0, 1)


def split_real(pairs: torch.Tensor) -> torch.Tensor:
    """(P, W) complex rows -> (2P, W) real rows: all real parts, then all imaginary parts."""
    return torch.cat([pairs.real, pairs.imag])


def complex_rows(block: torch.Tensor) -> torch.Tensor:
    """A (.., d, W) head block as its d/2 RoPE pairs (.., d/2, W), complex."""
    half = block.shape[-2] // 2
    return torch.complex(block[..., :half, :], block[..., half:, :])


def chol(matrix: torch.Tensor) -> torch.Tensor:
    size = matrix.shape[0]
    return torch.linalg.cholesky(matrix + EPS * (matrix.trace() / size + 1) * torch.eye(size, dtype=matrix.dtype))


def latent_targets(fusion: LayerFusion, moment: torch.Tensor, residual: torch.Tensor, free_queries: torch.Tensor):
    """M = [L_jᵀ ρ_j ; R_jᵀ W_v^j]_j and the weights [L_0, R_0, L_1, …] that unweight its blocks."""
    d = fusion.d
    mean = moment[:, -1]
    cov = moment - torch.outer(mean, mean)
    blocks, weights = [], []
    for j in range(fusion.kv):
        gram = torch.zeros(d, d, dtype=torch.float64)
        for i in (i for i in range(fusion.heads) if fusion.reads[i] == j):
            out = fusion.o[:, i] @ fusion.v[j]  # W_o^i W_v^j: (D, W)
            spread = (out @ cov * out).sum().clamp_min(0)  # S_i
            gram += spread / d * free_queries[i] @ moment @ free_queries[i].T
        L = chol(gram)
        blocks += [L.T @ split_real(residual[j]), fusion.R[j].T @ fusion.v[j]]
        weights += [L, fusion.R[j]]
    return torch.cat(blocks), weights


@dataclass
class LayerTargets:
    """What every latent of a layer is fitted to: M and its block weights, G = M C Mᵀ, the shared RoPE
    key's pairs and each KV head's scale c_j, and the queries (position-free ones with β folded in)."""

    fusion: LayerFusion
    M: torch.Tensor
    weights: list[torch.Tensor]
    gram: torch.Tensor
    shared: torch.Tensor
    scales: dict
    queries: torch.Tensor
    free_queries: torch.Tensor
    rope_dim: int


def layer_targets(fusion: LayerFusion, moment: torch.Tensor, beta: torch.Tensor, rope_dim: int) -> LayerTargets:
    """The shared RoPE key (one group: the key every head shares) and the latent's targets, from the
    calibration moment C (``moment``, (D+1)²) and ``beta`` (H, d/2): ``rotation_means``."""
    d, kept = fusion.d, rope_dim // 2
    fused, scales = fusion.fuse_keys(tuple(range(fusion.kv)))
    shared, keys, queries = complex_rows(fused), complex_rows(fusion.k), complex_rows(fusion.q)
    kept_pairs = (torch.arange(d // 2) < kept)[:, None]
    residual = torch.stack([torch.where(kept_pairs, keys[j] - scales[j][:, None] * shared, keys[j])
                            for j in range(fusion.kv)])  # ρ_j: (KV, d/2, W)
    free_queries = torch.stack([split_real(queries[i] * beta[i][:, None]) for i in range(fusion.heads)])  # q̃_i
    M, weights = latent_targets(fusion, moment, residual, free_queries)
    return LayerTargets(fusion, M, weights, M @ moment @ M.T, shared, scales, queries, free_queries, rope_dim)


def latent_basis(targets: LayerTargets, rank: int) -> torch.Tensor:
    """P: the top-r eigenvectors of G (reduced-rank regression, the module docstring)."""
    return torch.linalg.eigh(targets.gram)[1][:, -rank:]


def dha_fits(fusion: LayerFusion, rope_dim: int, rank: int) -> bool:
    """Whether DHA's solution fits the format: a RoPE key of the whole head_dim (DHA's fused key, one key
    group) and a latent of at least one value head."""
    return rope_dim == fusion.d and rank >= fusion.d


def dha_basis(targets: LayerTargets, rank: int) -> torch.Tensor:
    """P holding DHA's solution with one key group: the RoPE key is its fused key (``layer_targets``), the
    key residuals are dropped as DHA drops them, and the first g·d latent dims are DHA's g = min(KV, r // d)
    fused value heads — its grouping (``agglomerate`` on the value-fusion error) and, per group, the top-d
    eigenvectors of the group's value blocks of G, which are DHA's ``value_gram`` (``LayerFusion.fuse_values``:
    W_v^f = Σ_j P_jᵀ R_jᵀ W_v^j, read back through R_j⁻ᵀ P_j, DHA's M_jᵀ). Columns of different groups have
    disjoint rows, so P is orthonormal. A rank above g·d takes, on top, the top eigenvectors of G restricted
    to what DHA's part leaves (span(P)'s complement), so the latent keeps DHA's solution and adds to it."""
    fusion, gram = targets.fusion, targets.gram
    d, count = fusion.d, min(fusion.kv, rank // fusion.d)
    columns = []
    for group in agglomerate(fusion.kv, fusion.value_error, count)[count]:
        rows = torch.cat([torch.arange((2 * j + 1) * d, (2 * j + 2) * d) for j in group])  # value blocks of M
        top = torch.linalg.eigh(gram[rows][:, rows])[1][:, -d:]
        column = torch.zeros(len(gram), d, dtype=gram.dtype)
        column[rows] = top
        columns.append(column)
    P = torch.cat(columns, 1)
    rest = rank - P.shape[1]
    if rest:
        away = torch.eye(len(gram), dtype=gram.dtype) - P @ P.T
        remainder = away @ gram @ away - (gram.trace() + 1) * (P @ P.T)  # span(P) pushed below every other vector
        P = torch.cat([P, torch.linalg.eigh(remainder)[1][:, -rest:]], 1)
    return P


def basis_error(targets: LayerTargets, P: torch.Tensor) -> float:
    """The share of weighted target energy a latent spanning P leaves out: 1 − tr(Pᵀ G P) / tr(G)."""
    total = targets.gram.trace().clamp_min(1e-300)
    return ((total - (P.T @ targets.gram @ P).trace()) / total).clamp_min(0).item()


def fit_layer(targets: LayerTargets, P: torch.Tensor, inputs: torch.Tensor) -> MLAWeights:
    """The MLA weights of a layer whose latent spans the orthonormal basis P (KV·2d, r) of the weighted
    targets (``latent_basis`` or ``dha_basis``); ``inputs`` (N, D): calibration attention inputs, for the
    norm's scale."""
    fusion, rope_dim, rank = targets.fusion, targets.rope_dim, P.shape[1]
    d, kept, reads = fusion.d, targets.rope_dim // 2, fusion.reads
    A = P.T @ targets.M  # c = A x
    up = [torch.linalg.solve_triangular(W.T, P[n * d : (n + 1) * d], upper=True) for n, W in enumerate(targets.weights)]

    width = fusion.width - 1  # the bias column: zero, rehead refuses biases
    latent = inputs.double() @ A[:, :width].T
    scale = math.sqrt(NORM_LINEARITY * NORM_EPS / latent.pow(2).mean(-1).max().clamp_min(1e-300).item())
    fold = math.sqrt((d + rope_dim) / d)
    queries, scales = targets.queries, targets.scales
    rope_queries = [interleave(queries[i, :kept] * scales[reads[i]][:kept, None].conj()) for i in range(fusion.heads)]
    return MLAWeights(
        q_proj=fold * torch.cat([torch.cat([targets.free_queries[i], rope_queries[i]])
                                 for i in range(fusion.heads)])[:, :width],
        kv_a_proj_with_mqa=torch.cat([scale * A, interleave(targets.shared[:kept])])[:, :width],
        kv_a_layernorm=torch.full((rank,), math.sqrt(NORM_EPS) / scale, dtype=torch.float64),
        kv_b_proj=torch.cat([torch.cat([up[2 * reads[i]], up[2 * reads[i] + 1]]) for i in range(fusion.heads)]),
        o_proj=fusion.o.flatten(1),
        latent_error=basis_error(targets, P),
    )

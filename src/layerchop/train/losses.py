"""Distillation loss terms as pure functions of tensors (CHOP + distill, Homotopic-distillation style).

Shapes: ``N`` tokens (batch x time, flattened), ``D`` hidden size, ``V`` vocabulary.

The LM and KL terms share the output head, so they are computed together by
:func:`chunked_lm_kl`: the logits of ``C`` tokens at a time, with the gradient with respect to the
student's hidden states and head computed in the same pass (as fused linear cross-entropy kernels do).
Memory stays at one ``C x V`` block however long the batch; the teacher's head is only needed in the
forward pass, so under FSDP2 it can be resharded before the backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _ChunkedLMKL(torch.autograd.Function):
    """``w_lm * CE(student) + w_kl * tau^2 * KL(teacher || student)``, chunked over tokens.

    Forward computes the loss and its gradients with respect to ``h_s`` and ``w_s`` (stored for
    backward, which scales them by the incoming gradient). All arithmetic in float32.
    """

    @staticmethod
    def forward(ctx, h_s_ND, w_s_VD, h_t_ND, w_t_VD, targets_N, kl_mask_N, temperature, w_lm, w_kl, chunk):
        device_type = h_s_ND.device.type if h_s_ND.device.type != "meta" else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            n = h_s_ND.shape[0]
            w_s = w_s_VD.float()
            w_t = w_t_VD.float() if w_kl else None
            valid_N = targets_N != IGNORE_INDEX
            n_lm = valid_N.sum().clamp(min=1)
            n_kl = kl_mask_N.sum().clamp(min=1)
            grad_h = torch.zeros_like(h_s_ND, dtype=torch.float32)
            grad_w = torch.zeros_like(w_s)
            lm_sum = h_s_ND.new_zeros((), dtype=torch.float32)
            kl_sum = h_s_ND.new_zeros((), dtype=torch.float32)
            for start in range(0, n, chunk):
                sl = slice(start, min(n, start + chunk))
                h_CD = h_s_ND[sl].float()
                z_CV = h_CD @ w_s.T
                g_CV = torch.zeros_like(z_CV)
                if w_lm:
                    logp_CV = torch.log_softmax(z_CV, dim=-1)
                    tgt_C = targets_N[sl]
                    ok_C = tgt_C != IGNORE_INDEX
                    safe_C = torch.where(ok_C, tgt_C, torch.zeros_like(tgt_C))
                    nll_C = -logp_CV.gather(1, safe_C[:, None])[:, 0]
                    lm_sum = lm_sum + (nll_C * ok_C).sum()
                    d_CV = logp_CV.exp()
                    d_CV.scatter_add_(1, safe_C[:, None], -torch.ones_like(d_CV[:, :1]))
                    g_CV += (w_lm / n_lm) * d_CV * ok_C[:, None]
                if w_kl:
                    zt_CV = h_t_ND[sl].float() @ w_t.T
                    logq_s = torch.log_softmax(z_CV / temperature, dim=-1)
                    logq_t = torch.log_softmax(zt_CV / temperature, dim=-1)
                    q_t = logq_t.exp()
                    m_C = kl_mask_N[sl]
                    kl_C = (q_t * (logq_t - logq_s)).sum(-1)
                    kl_sum = kl_sum + (kl_C * m_C).sum()
                    # d/dz_s [tau^2 KL(q_t || q_s)] = tau * (q_s - q_t)
                    g_CV += (w_kl * temperature / n_kl) * (logq_s.exp() - q_t) * m_C[:, None]
                grad_h[sl] = g_CV @ w_s
                grad_w += g_CV.T @ h_CD
            lm = lm_sum / n_lm
            kl = kl_sum * temperature**2 / n_kl
            total = w_lm * lm + w_kl * kl
        ctx.save_for_backward(grad_h.to(h_s_ND.dtype), grad_w.to(w_s_VD.dtype))
        ctx.mark_non_differentiable(lm, kl)
        return total, lm, kl

    @staticmethod
    def backward(ctx, g_total, _g_lm, _g_kl):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g_total, grad_w * g_total, None, None, None, None, None, None, None, None


def chunked_lm_kl(
    h_s_ND: torch.Tensor,
    w_s_VD: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    h_t_ND: Optional[torch.Tensor] = None,
    w_t_VD: Optional[torch.Tensor] = None,
    kl_mask_N: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    w_lm: float = 1.0,
    w_kl: float = 1.0,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LM cross-entropy and temperature-scaled KL(teacher || student) from final hidden states.

    Args:
        h_s_ND: Student final (normed) hidden states; differentiable.
        w_s_VD: Student output head; differentiable (may be the tied embedding).
        targets_N: Next-token ids, ``-100`` where there is none.
        h_t_ND, w_t_VD: Teacher final hidden states and head (no gradient). Required when ``w_kl > 0``.
        kl_mask_N: Positions where the KL counts (default: all).
        temperature: Softmax temperature; the KL is multiplied by ``temperature**2`` (Hinton et al.).
        w_lm, w_kl: Weights of the two terms in ``total``.
        chunk: Tokens per block of logits.

    Returns:
        ``(total, lm, kl)``: ``total = w_lm * lm + w_kl * kl`` carries the gradient; ``lm`` (mean over
        valid targets) and ``kl`` (mean over ``kl_mask_N``) are detached, for logging.
    """
    if w_kl and (h_t_ND is None or w_t_VD is None):
        raise ValueError("chunked_lm_kl: w_kl > 0 needs the teacher's hidden states and head")
    if chunk <= 0:
        raise ValueError(f"chunked_lm_kl: chunk={chunk} must be > 0")
    if kl_mask_N is None:
        kl_mask_N = torch.ones_like(targets_N, dtype=torch.bool)
    return _ChunkedLMKL.apply(h_s_ND, w_s_VD, h_t_ND, w_t_VD, targets_N, kl_mask_N, float(temperature),
                              float(w_lm), float(w_kl), int(chunk))


def lm_kl_reference(h_s_ND, w_s_VD, targets_N, h_t_ND, w_t_VD, kl_mask_N, temperature=1.0):
    """Unchunked autograd version of :func:`chunked_lm_kl`'s two terms (for tests)."""
    z_s = h_s_ND.float() @ w_s_VD.float().T
    lm = F.cross_entropy(z_s, targets_N, ignore_index=IGNORE_INDEX)
    z_t = h_t_ND.float() @ w_t_VD.float().T
    kl_N = F.kl_div(torch.log_softmax(z_s / temperature, -1), torch.log_softmax(z_t / temperature, -1),
                    reduction="none", log_target=True).sum(-1)
    kl = (kl_N * kl_mask_N).sum() / kl_mask_N.sum().clamp(min=1) * temperature**2
    return lm, kl


def masked_mse(pred_NTD: torch.Tensor, target_NTD: torch.Tensor, mask_NT: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error over the hidden dimension and the masked (real-token) positions, in float32."""
    se_NT = (pred_NTD.float() - target_NTD.float()).pow(2).mean(-1)
    if mask_NT is None:
        return se_NT.mean()
    mask = mask_NT.to(se_NT.dtype)
    return (se_NT * mask).sum() / mask.sum().clamp(min=1)


def layer_sum_mse(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    projections: Optional[list[torch.nn.Module]] = None,
    mask_NT: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``sum_k MSE(teacher[k], projections[k](student[k]))`` (no projection when ``projections`` is None).

    ``student[k]`` and ``teacher[k]`` are ``[B, T, D]`` activations of student layer ``k`` and of the
    teacher layer it is matched to.
    """
    if len(student) != len(teacher):
        raise ValueError(f"layer_sum_mse: {len(student)} student vs {len(teacher)} teacher activations")
    total = student[0].new_zeros((), dtype=torch.float32)
    for k, (s, t) in enumerate(zip(student, teacher)):
        total = total + masked_mse(projections[k](s) if projections is not None else s, t, mask_NT)
    return total


def embedding_mse(e_t_VD: torch.Tensor, e_s_VD: torch.Tensor, projection: torch.nn.Module) -> torch.Tensor:
    """``MSE(E_t, E_s W_emb)`` over the embedding tables."""
    return masked_mse(projection(e_s_VD), e_t_VD)

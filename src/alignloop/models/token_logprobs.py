"""Log-probabilities of chosen tokens (and the entropy) from next-token logits, computed a few rows at a time.

``log_softmax(logits).gather(tokens)`` holds a float32 copy of the whole [N, vocab] log-softmax for its
backward, and the backward adds two more [N, vocab] float32 tensors (the gather's dense gradient and the
log-softmax's) before casting to the logits' dtype: at a 25 M model's SFT or DPO batch these are the largest
tensors of the step. Here the backward keeps only the logits themselves (bf16 under autocast) and one float32
per row (the log-normaliser), recomputes the softmax from them, and writes the gradient straight into one
tensor of the logits' dtype; every float32 intermediate covers ``CHUNK_ELEMENTS`` logits, so it stays in cache.

The gradients, with p = softmax(x), x = logits / temperature, H = -sum p log p:
  d log p[t] / dx = onehot(t) - p,    dH / dx = -p (log p + H).
"""

from __future__ import annotations

import torch

# float32 logits per intermediate (4 MB): several passes over a chunk of rows cost about one pass over memory
CHUNK_ELEMENTS = 1 << 20


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in float32, or float64 for float64 logits (x / 1.0 == x exactly, so that division
    is skipped)."""
    x = logits.to(_result_dtype(logits))
    return x if temperature == 1.0 else x / temperature


def _result_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool):
        n, vocab = logits.shape
        rows = max(1, CHUNK_ELEMENTS // vocab)
        logp = torch.empty(n, dtype=_result_dtype(logits), device=logits.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty(n if with_entropy else 0, dtype=logp.dtype, device=logits.device)
        for s in range(0, n, rows):
            x = _scaled(logits[s:s + rows], temperature)
            # log_softmax's fused kernel is faster than logsumexp's steps; the normaliser follows from it
            logp_all = torch.log_softmax(x, -1)
            chunk_tokens = tokens[s:s + rows, None]
            chunk_logp = logp_all.gather(-1, chunk_tokens).squeeze(-1)
            logp[s:s + rows] = chunk_logp
            lse[s:s + rows] = x.gather(-1, chunk_tokens).squeeze(-1) - chunk_logp
            if with_entropy:
                entropy[s:s + rows] = -(logp_all.exp() * logp_all).sum(-1)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, tokens, lse, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        n, vocab = logits.shape
        rows = max(1, CHUNK_ELEMENTS // vocab)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for s in range(0, n, rows):
            x = _scaled(logits[s:s + rows], temperature)
            logp_all = x - lse[s:s + rows, None]  # log softmax of the chunk
            wants_entropy = grad_entropy is not None and entropy.numel() > 0
            p = logp_all.exp() if wants_entropy else logp_all.exp_()
            if grad_logp is not None:
                g_rows = grad_logp[s:s + rows, None]
                g = p.mul(g_rows.neg()).scatter_add_(-1, tokens[s:s + rows, None], g_rows)
            else:
                g = torch.zeros_like(p)
            if wants_entropy:
                logp_all.add_(entropy[s:s + rows, None])
                g.addcmul_(p.mul_(logp_all), grad_entropy[s:s + rows, None], value=-1)
            if temperature != 1.0:
                g.div_(temperature)
            grad[s:s + rows] = g
        return grad, None, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[token] in float32 (float64 for float64 logits), per row of logits
    [N, vocab] and tokens [N]."""
    return _TokenLogprobs.apply(logits, tokens, temperature, False)[0]


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_logprobs, the entropy of softmax(logits / temperature)) per row, both differentiable; the
    entropy costs one more pass over each chunk of the forward."""
    return _TokenLogprobs.apply(logits, tokens, temperature, True)

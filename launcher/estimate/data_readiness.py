"""Is each stage's data ready, and is there enough of it? From the token store's index alone.

For every stage the dry run shows the tokens one pass over its prepared
data yields (long documents upsampled as the stage packs them) against the
tokens the stage trains on, how many documents are longer than a quarter of
its context (the ones that teach long-range use), and what share of an
average sample they fill. A stage that would pass over its data more than
``REPEAT_LIMIT`` times is flagged: it sees the same tokens that often.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from launcher.recipe import Recipe
from topology.errors import ConfigError, first_line
from trainer.config import DataConfig
from trainer.data.packing import stream_stats
from trainer.data.prepare import PrepareSpec, locate
from trainer.data.store import TokenStore, is_complete

REPEAT_LIMIT = 4.0
"""Passes over the same tokens above which a stage is flagged."""


@dataclass(frozen=True)
class Readiness:
    """One stage's data as the dry run reports it."""

    stage: str
    data: DataConfig
    consumed: int
    status: str
    """``ready``, or why there are no figures (``not prepared``, ``not here``, ``no tokenizer``)."""
    stream_tokens: int = 0
    long_documents: int = 0
    long_share: float = 0.0

    @property
    def passes(self) -> float | None:
        return self.consumed / self.stream_tokens if self.stream_tokens else None

    def flag(self) -> str | None:
        if self.passes is None or self.passes <= REPEAT_LIMIT:
            return None
        return (f"stage {self.stage}: trains on {self.consumed:,} tokens from {self.stream_tokens:,} prepared, "
                f"so it sees the same tokens {self.passes:.1f} times (more than {REPEAT_LIMIT:g}); add data or cut steps")


def readiness(recipe: Recipe, consumed: dict[str, int], root: str | Path) -> list[Readiness]:
    """Each stage's readiness; ``consumed`` is the tokens each stage trains on, ``root`` the store root."""
    stores: dict[PrepareSpec, TokenStore | str] = {}
    out = []
    for stage in recipe.stages:
        data = stage.data or recipe.data
        if data.synthetic is not None:
            out.append(Readiness(stage.name, data, consumed[stage.name], "generated on each rank (data.synthetic)"))
            continue
        spec = PrepareSpec.of(data, recipe.model)
        if spec not in stores:
            stores[spec] = _store(spec, root)
        store = stores[spec]
        if isinstance(store, str):
            out.append(Readiness(stage.name, data, consumed[stage.name], store))
            continue
        s = stream_stats(store.lengths, data, stage.seq_len)
        out.append(Readiness(stage.name, data, consumed[stage.name], "ready", s.stream_tokens, s.long_documents, s.long_share))
    return out


def _store(spec: PrepareSpec, root: str | Path) -> TokenStore | str:
    """The prepared store of ``spec``, or why there is none to read here."""
    if not Path(spec.path).exists():
        return "not here"
    try:
        path, _, _ = locate(spec, root)
    except ConfigError as exc:
        return f"unreadable ({first_line(exc)})"
    return TokenStore.open(path) if is_complete(path) else "not prepared"

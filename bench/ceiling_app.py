"""Measurement aid for ``python -m bench --ceiling``; never served, never imported by the service.

How close to the no-op floor could the service get if its own work cost nothing? Each variant is the real
service app (same factory, validation, prefetch handling, draft checks, card rendering, gunicorn settings)
with parts taken out in this process only:

- ``no-evaluation``: the clinical evaluation (facts and rules, ``cards.engine.evaluate``) runs once,
  on the first call; every later call gets copies of those cards with fresh uuids, as a real evaluation
  would give. Everything else runs as in production.
- ``protocol-only``: also no record of the issued cards, no request log line and no metrics: what is left
  is the CDS Hooks protocol work (parse, schemas, draft checks, prefetch, rendering) on top of the floor.

If even these miss a throughput target, optimising the clinical code cannot meet it (bench/README.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask

from cards.model import Card, new_card_uuid, new_uuid

VARIANTS = ("no-evaluation", "protocol-only")


def _fresh_copy(card: Card) -> Card:
    suggestions = tuple(dataclasses.replace(s, uuid=new_uuid()) for s in card.suggestions)
    return dataclasses.replace(card, suggestions=suggestions, uuid=new_card_uuid())


def _evaluate_once(real: Callable[..., list[Card]]) -> Callable[..., list[Card]]:
    first: list[list[Card]] = []

    def evaluate(*args: Any) -> list[Card]:
        if not first:
            first.append(real(*args))
        return [_fresh_copy(card) for card in first[0]]

    return evaluate


def build(
    variant: str,
    config: Mapping[str, Any] | None = None,
    *,
    patch: Callable[[Any, str, Any], None] = setattr,
) -> Flask:
    """The service app (``service.app.create_app(config)``) with ``variant``'s parts taken out; gunicorn
    calls this as ``bench.ceiling_app:build('protocol-only')``. The parts are replaced process-wide with
    ``patch`` (tests pass ``monkeypatch.setattr`` so that the replacements are undone)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ceiling variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    from cards.engine import evaluate
    from service import hooks, metrics
    from service.app import create_app
    from service.store import FeedbackStore

    patch(hooks, "evaluate", _evaluate_once(evaluate))  # the name service.hooks calls
    if variant == "protocol-only":
        patch(FeedbackStore, "record_cards_later", lambda *_args, **_kwargs: None)
        patch(metrics, "observe_request", lambda *_args, **_kwargs: None)
        patch(metrics, "count_cards", lambda *_args, **_kwargs: None)
        patch(logging.getLogger("cmv_cds.app"), "disabled", True)  # the request log line; no other on this path
    return create_app(config)

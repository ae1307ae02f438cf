"""The cards the clinical rules produce, and their CDS Hooks 2.0.1 JSON form.

Optional members that have no value are omitted (the spec prohibits ``null``, ``""``, ``[]`` and
``{}``). Every card and every suggestion gets a uuid so that clients can send feedback.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from cards.codes import FHIR_PROFILES_DIR

Indicator = Literal["info", "warning", "critical"]
ActionType = Literal["create", "update", "delete"]

# Card topics: one code per rule family, so feedback and metrics can be grouped by rule.
TOPIC_SYSTEM = "http://fhir.cmv-cds.org/CodeSystem/cmv-cds-rule"


# Random ids are drawn from os.urandom (the kernel's CSPRNG, as uuid.uuid4 does) 64 at a time: one system
# call per 64 ids instead of one per id, which is most of what uuid4 costs on a virtual machine (issue 15:
# 5–6 µs each, four or more per request). Each id still has uuid4's 122 random bits from the CSPRNG and is
# independent of every other, so card and suggestion ids, which key feedback, stay unguessable; only the
# moment the bytes are read changes. (random.getrandbits was not used: the Mersenne Twister's output can be
# predicted from 624 observed values.) A forked child drops its parent's unused ids, so two gunicorn workers
# never hand out the same ones.
_IDS_PER_READ = 64
_unused_ids: list[str] = []
os.register_at_fork(after_in_child=_unused_ids.clear)


def _read_ids() -> None:
    """Append ``_IDS_PER_READ`` fresh version-4 UUIDs (RFC 9562 §5.4 layout, lowercase hex) to the pool."""
    raw = os.urandom(16 * _IDS_PER_READ).hex()
    fresh = []
    for start in range(0, len(raw), 32):
        h = raw[start : start + 32]
        variant = "89ab"[int(h[16], 16) & 3]  # the two variant bits 10, then two random bits
        fresh.append(f"{h[0:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}")
    _unused_ids.extend(fresh)


def new_uuid() -> str:
    """A random (version 4) UUID, as ``str(uuid.uuid4())`` (see ``_IDS_PER_READ`` above for how it is drawn)."""
    while True:
        try:
            return _unused_ids.pop()  # atomic under the GIL: threads never get the same id
        except IndexError:
            _read_ids()


def new_card_uuid() -> str:
    """A card's uuid: a version 7 UUID (RFC 9562 §5.7), the Unix time in milliseconds followed by 74 random bits
    (those of a ``new_uuid``). Card uuids key the issued-card table and feedback: keys in time order are inserted
    at the end of the database's index instead of on a random page each, which with two workers writing one
    SQLite file cost about half the issued-card writer's CPU (bench/README.md, round 5). 74 bits from the CSPRNG
    keep them unguessable; the time they show is when the card was returned to the client."""
    random_part = new_uuid()[15:]  # after "xxxxxxxx-xxxx-4": 12 random bits, the variant nibble, 60 random bits
    millis = f"{time.time_ns() // 1_000_000:012x}"
    return f"{millis[:8]}-{millis[8:]}-7{random_part}"


# Native constructors. The dataclasses built on every hook call, here and elsewhere in cards/, spell out their
# ``__init__`` (``init=False``): compiled (scripts/compile_hot_path.py), a written ``__init__`` is native code, where
# the one dataclasses generates stays interpreted Python, 7-10x slower per object (bench/README.md, rounds 7 and 8).
# Frozen ones set each field with ``object.__setattr__``, as the generated one does. Equality, hashing, ``repr``,
# ``dataclasses.replace`` and the frozen guard stay the dataclass's (tests/test_card_model.py).
@dataclass(frozen=True, init=False)
class Coding:
    system: str
    code: str
    display: str | None = None

    def __init__(self, system: str, code: str, display: str | None = None) -> None:
        object.__setattr__(self, "system", system)
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "display", display)

    def to_json(self) -> dict[str, str]:
        """The CDS Hooks / FHIR JSON of this value."""
        data = {"system": self.system, "code": self.code}
        if self.display:
            data["display"] = self.display
        return data


@dataclass(frozen=True, init=False)
class Source:
    label: str
    url: str | None = None

    def __init__(self, label: str, url: str | None = None) -> None:
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "url", url)

    def to_json(self, topic: Coding) -> dict[str, Any]:
        """The CDS Hooks JSON of this value."""
        data: dict[str, Any] = {"label": self.label, "topic": topic.to_json()}
        if self.url:
            data["url"] = self.url
        return data


@dataclass(frozen=True, init=False)
class Action:
    type: ActionType
    description: str
    resource: dict[str, Any] | None = None
    resource_id: str | None = None

    def __init__(
        self,
        type: ActionType,
        description: str,
        resource: dict[str, Any] | None = None,
        resource_id: str | None = None,
    ) -> None:
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "resource", resource)
        object.__setattr__(self, "resource_id", resource_id)

    def to_json(self) -> dict[str, Any]:
        """The CDS Hooks JSON of this value."""
        data: dict[str, Any] = {"type": self.type, "description": self.description}
        if self.resource is not None:
            data["resource"] = self.resource
        if self.resource_id is not None:
            data["resourceId"] = self.resource_id
        return data


@dataclass(frozen=True, init=False)
class Suggestion:
    label: str
    actions: tuple[Action, ...]
    is_recommended: bool = False
    uuid: str = field(default_factory=new_uuid)

    def __init__(
        self, label: str, actions: tuple[Action, ...], is_recommended: bool = False, uuid: str | None = None
    ) -> None:
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "actions", actions)
        object.__setattr__(self, "is_recommended", is_recommended)
        object.__setattr__(self, "uuid", new_uuid() if uuid is None else uuid)

    def to_json(self) -> dict[str, Any]:
        """The CDS Hooks JSON of this value."""
        data: dict[str, Any] = {"label": self.label, "uuid": self.uuid, "isRecommended": self.is_recommended}
        if self.actions:
            data["actions"] = [action.to_json() for action in self.actions]
        return data


@dataclass(frozen=True, init=False)
class Link:
    label: str
    url: str

    def __init__(self, label: str, url: str) -> None:
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "url", url)

    def to_json(self) -> dict[str, str]:
        """The CDS Hooks JSON of this value."""
        return {"label": self.label, "url": self.url, "type": "absolute"}


@dataclass(frozen=True, init=False)
class Card:
    """One card. ``rule_id`` names the rule that produced it (topic code, metrics, feedback)."""

    rule_id: str
    summary: str
    indicator: Indicator
    detail: str
    source: Source
    suggestions: tuple[Suggestion, ...] = ()
    selection_behavior: Literal["at-most-one", "any"] | None = None
    links: tuple[Link, ...] = ()
    uuid: str = field(default_factory=new_card_uuid)

    def __init__(
        self,
        rule_id: str,
        summary: str,
        indicator: Indicator,
        detail: str,
        source: Source,
        suggestions: tuple[Suggestion, ...] = (),
        selection_behavior: Literal["at-most-one", "any"] | None = None,
        links: tuple[Link, ...] = (),
        uuid: str | None = None,
    ) -> None:
        object.__setattr__(self, "rule_id", rule_id)
        object.__setattr__(self, "summary", summary)
        object.__setattr__(self, "indicator", indicator)
        object.__setattr__(self, "detail", detail)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "suggestions", suggestions)
        object.__setattr__(self, "selection_behavior", selection_behavior)
        object.__setattr__(self, "links", links)
        object.__setattr__(self, "uuid", new_card_uuid() if uuid is None else uuid)
        self.__post_init__()

    def __post_init__(self) -> None:
        # Guard the spec's invariants at construction so a rule cannot emit a malformed card.
        if not 0 < len(self.summary) < 140:
            raise ValueError(f"card summary must be 1-139 characters ({self.rule_id}: {len(self.summary)})")
        if self.suggestions and self.selection_behavior is None:
            raise ValueError(f"card {self.rule_id} has suggestions but no selectionBehavior")

    @property
    def topic(self) -> Coding:
        return Coding(TOPIC_SYSTEM, self.rule_id, self.rule_id.replace("-", " "))

    def to_json(self) -> dict[str, Any]:
        """The CDS Hooks JSON of this card."""
        data: dict[str, Any] = {
            "uuid": self.uuid,
            "summary": self.summary,
            "indicator": self.indicator,
            "source": self.source.to_json(self.topic),
        }
        if self.detail:
            data["detail"] = self.detail
        if self.suggestions:
            data["suggestions"] = [s.to_json() for s in self.suggestions]
            data["selectionBehavior"] = self.selection_behavior
        if self.indicator in ("warning", "critical"):
            data["overrideReasons"] = [reason.to_json() for reason in override_reasons()]
        if self.links:
            data["links"] = [link.to_json() for link in self.links]
        return data


@functools.cache
def override_reasons() -> tuple[Coding, ...]:
    """Override reasons offered on warning/critical cards, from fhir_profiles (not restated here)."""
    path = FHIR_PROFILES_DIR / "ValueSet-cds-override-reasons.json"
    value_set = json.loads(path.read_text(encoding="utf-8"))
    return tuple(
        Coding(include["system"], concept["code"], concept["display"])
        for include in value_set["compose"]["include"]
        for concept in include["concept"]
    )

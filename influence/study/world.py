"""A fictional world: generated entities and the facts that relate them.

Entities (countries, cities, people, elements) get names built from the hand-written
syllables in `data/names.json`, so no model can know anything about them in advance and the
same name is used in every language, as proper nouns are. Relations:

    capital     country -> city      leader      country -> person
    birthplace  person  -> city      discoverer  element -> person

Every fact has an id (its index in `World.facts`) and a set of languages it is stated in:
most facts are stated in all languages, a share (`mono_share`) in one language only, so that
cross-lingual transfer (a fact asked in a language it was never stated in) can be measured.

Everything is drawn from one `random.Random(seed)`: the same seed and sizes give the same world.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
LANGUAGES = ("en", "fr", "de")
RELATIONS = {
    "capital": ("country", "city"),
    "leader": ("country", "person"),
    "birthplace": ("person", "city"),
    "discoverer": ("element", "person"),
}


def load_json(name: str) -> dict:
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Entity:
    id: int
    type: str
    name: str


@dataclass(frozen=True)
class Fact:
    id: int
    relation: str
    subject: str
    object: str
    languages: tuple[str, ...]

    @property
    def multilingual(self) -> bool:
        return len(self.languages) > 1


@dataclass
class World:
    entities: list[Entity] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "entities": [asdict(e) for e in self.entities],
            "facts": [dict(asdict(f), languages=list(f.languages)) for f in self.facts],
        }

    @classmethod
    def from_dict(cls, d: dict) -> World:
        return cls(
            entities=[Entity(**e) for e in d["entities"]],
            facts=[dict_to_fact(f) for f in d["facts"]],
        )

    def names(self, type_: str) -> list[str]:
        return [e.name for e in self.entities if e.type == type_]


def dict_to_fact(f: dict) -> Fact:
    return Fact(**{**f, "languages": tuple(f["languages"])})


class NameMaker:
    """Unique pronounceable names from syllables; capitalised, consonant-initial."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.syl = load_json("names.json")
        self.used: set[str] = set()

    def _stem(self, n_syllables: int) -> str:
        s = self.syl
        parts = [
            self.rng.choice(s["onsets"]) + self.rng.choice(s["vowels"]) for _ in range(n_syllables)
        ]
        return "".join(parts) + self.rng.choice(s["codas"])

    def make(self, type_: str) -> str:
        suf = self.syl["suffixes"]
        for _ in range(1000):
            if type_ == "person":
                first = self._stem(self.rng.choice((1, 2))) + self.rng.choice(suf["first"])
                last = self._stem(self.rng.choice((1, 2))) + self.rng.choice(suf["last"])
                name = f"{first.capitalize()} {last.capitalize()}"
            else:
                name = (
                    self._stem(self.rng.choice((1, 2))) + self.rng.choice(suf[type_])
                ).capitalize()
            # Every word of every name must be unique across the world, so that a name's words
            # identify one entity.
            words = name.split()
            if len(name) >= 4 and not any(w in self.used for w in words):
                self.used.update(words)
                return name
        raise RuntimeError("could not generate a fresh name; enlarge data/names.json")


def make_world(
    seed: int,
    n_countries: int,
    n_people: int,
    n_elements: int,
    mono_share: float,
    languages: tuple[str, ...] = LANGUAGES,
) -> World:
    """Generate a world. People are born in cities; countries have a capital and a leader;
    elements have a discoverer. Leaders and discoverers are drawn from the people."""
    rng = random.Random(f"world-{seed}")
    names = NameMaker(rng)
    entities: list[Entity] = []

    def new(type_: str) -> str:
        e = Entity(len(entities), type_, names.make(type_))
        entities.append(e)
        return e.name

    countries = [new("country") for _ in range(n_countries)]
    n_cities = max(n_countries + n_people // 3, 2)
    cities = [new("city") for _ in range(n_cities)]
    people = [new("person") for _ in range(n_people)]
    elements = [new("element") for _ in range(n_elements)]

    triples: list[tuple[str, str, str]] = []
    capitals = rng.sample(cities, n_countries)
    leaders = rng.sample(people, min(n_countries, n_people))
    for i, c in enumerate(countries):
        triples.append(("capital", c, capitals[i]))
        triples.append(("leader", c, leaders[i % len(leaders)]))
    for p in people:
        triples.append(("birthplace", p, rng.choice(cities)))
    for el in elements:
        triples.append(("discoverer", el, rng.choice(people)))
    rng.shuffle(triples)

    # Language assignment: the first `mono` facts (after shuffling) are stated in one language
    # only, spread evenly over the languages; the rest in all of them.
    n_mono = round(mono_share * len(triples))
    facts = []
    for i, (rel, s, o) in enumerate(triples):
        langs = (languages[i % len(languages)],) if i < n_mono else tuple(languages)
        facts.append(Fact(i, rel, s, o, langs))
    return World(entities, facts)

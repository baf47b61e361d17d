"""A fictional world: generated entities and the facts that relate them.

Entities (countries, cities, people, elements) get names built from the hand-written parts in
`data/names.json`, so no model can know anything about them in advance. Every entity has one
name per language: a language-neutral stem spelled by that language's rule plus a per-language
suffix (`NameMaker`), e.g. Kowria / Quaorie / Kaurien, so cross-lingual transfer cannot ride
identical name tokens. A control set of entities (`shared_share` of each type) keeps its
English name in every language, as most proper nouns do; facts relate control entities only
to control entities, so every fact's names are either all localized or all shared
(`Fact.names`). Relations:

    capital     country -> city      leader      country -> person
    birthplace  person  -> city      discoverer  element -> person

Every fact has an id (its index in `World.facts`) and the languages it is stated in: most facts
in all languages, a share (`mono_share`) in one language only, so that cross-lingual transfer
(a fact asked in a language it was never stated in) can be measured. A fact is stated in one
language only when both of its entities also appear in another fact stated in every language,
so that their names in the other languages are attested in training.

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
ENTITY_TYPES = ("country", "city", "person", "element")
LOCALIZED, SHARED = "localized", "shared"


def load_json(name: str) -> dict:
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Entity:
    id: int
    type: str
    names: dict[str, str]  # language -> the entity's name in that language
    shared: bool  # control set: the same name in every language


@dataclass(frozen=True)
class Fact:
    id: int
    relation: str
    subject: int  # entity ids
    object: int
    languages: tuple[str, ...]
    names: str  # LOCALIZED or SHARED

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
            facts=[Fact(**{**f, "languages": tuple(f["languages"])}) for f in d["facts"]],
        )

    def name(self, entity: int, language: str) -> str:
        return self.entities[entity].names[language]

    def names(self, type_: str, language: str = "en") -> list[str]:
        return [e.names[language] for e in self.entities if e.type == type_]


class NameMaker:
    """Unique pronounceable names, one form per language (see the module doc).

    Every word of every form is unique across everything this maker produced, so that a word
    identifies one entity in any language; a localized name's forms differ in every language
    (word by word), a shared one is the English form everywhere."""

    def __init__(self, rng: random.Random, languages: tuple[str, ...] = LANGUAGES):
        self.rng = rng
        self.languages = languages
        self.parts = load_json("names.json")
        self.used: set[str] = set()

    def _spell(self, stem: list[tuple[str, str]], language: str) -> str:
        rule = self.parts["spelling"][language]
        return "".join(rule[kind].get(part, part) for kind, part in stem)

    def _word(self, suffix_kind: str) -> dict[str, str]:
        p = self.parts
        stem = []
        for _ in range(self.rng.choice(self.parts["syllables"])):
            stem.append(("onsets", self.rng.choice(p["onsets"])))
            stem.append(("vowels", self.rng.choice(p["vowels"])))
        stem.append(("codas", self.rng.choice(p["codas"])))
        suffix = self.rng.choice(p["suffixes"][suffix_kind])
        return {
            lang: (self._spell(stem, lang) + suffix[lang]).capitalize() for lang in self.languages
        }

    def make(self, type_: str, shared: bool = False) -> dict[str, str]:
        """{language: name} for a new entity of `type_`."""
        for _ in range(1000):
            words = [self._word(type_)]
            if shared:
                words = [{lang: w["en"] for lang in self.languages} for w in words]
            forms = {w for word in words for w in word.values()}
            distinct = all(len(set(w.values())) == len(self.languages) for w in words)
            if all(len(w) >= 4 for w in forms) and (shared or distinct) and not forms & self.used:
                self.used |= forms
                return {lang: " ".join(w[lang] for w in words) for lang in self.languages}
        raise RuntimeError("could not generate a fresh name; enlarge data/names.json")


def _counts(n: int, shared_share: float) -> tuple[int, int]:
    shared = round(shared_share * n)
    return n - shared, shared


def make_world(
    seed: int,
    n_countries: int,
    n_people: int,
    n_elements: int,
    mono_share: float,
    shared_share: float,
    languages: tuple[str, ...] = LANGUAGES,
) -> World:
    """Generate a world. People are born in cities; countries have a capital and a leader;
    elements have a discoverer. Leaders and discoverers are drawn from the people. The
    control entities (`shared_share` of each type) form their own sub-world."""
    for name, share in (("mono_share", mono_share), ("shared_share", shared_share)):
        if not 0 <= share < 1:
            raise ValueError(f"{name} must be in [0, 1), got {share}")
    rng = random.Random(f"world-{seed}")
    maker = NameMaker(rng, languages)
    entities: list[Entity] = []
    triples: list[tuple[str, int, int, str]] = []

    def new(type_: str, shared: bool) -> int:
        entities.append(Entity(len(entities), type_, maker.make(type_, shared), shared))
        return entities[-1].id

    for shared, i in ((False, 0), (True, 1)):
        n_c, n_p, n_e = (_counts(n, shared_share)[i] for n in (n_countries, n_people, n_elements))
        if shared and n_c + n_p + n_e == 0:
            continue
        if n_c < 1 or n_p < 1:
            part = "control" if shared else "localized"
            raise ValueError(
                f"the {part} part of the world needs at least one country and one person "
                f"(n_countries={n_countries}, n_people={n_people}, shared_share={shared_share})"
            )
        countries = [new("country", shared) for _ in range(n_c)]
        cities = [new("city", shared) for _ in range(max(n_c + n_p // 3, 2))]
        people = [new("person", shared) for _ in range(n_p)]
        elements = [new("element", shared) for _ in range(n_e)]
        label = SHARED if shared else LOCALIZED
        capitals = rng.sample(cities, n_c)
        leaders = rng.sample(people, min(n_c, n_p))
        for k, c in enumerate(countries):
            triples.append(("capital", c, capitals[k], label))
            triples.append(("leader", c, leaders[k % len(leaders)], label))
        triples += [("birthplace", p, rng.choice(cities), label) for p in people]
        triples += [("discoverer", el, rng.choice(people), label) for el in elements]
    rng.shuffle(triples)
    mono = _mono_facts(triples, round(mono_share * len(triples)), mono_share)
    facts = []
    for i, (rel, s, o, label) in enumerate(triples):
        langs = (languages[mono[i] % len(languages)],) if i in mono else tuple(languages)
        facts.append(Fact(i, rel, s, o, langs, label))
    return World(entities, facts)


def _mono_facts(triples: list[tuple], n_mono: int, share: float) -> dict[int, int]:
    """{fact index: k} for `n_mono` facts stated in one language (the k-th mono fact gets
    language k mod 3), in shuffled order, each taken only if both of its entities keep
    another fact stated in every language."""
    multi: dict[int, int] = {}
    for _, s, o, _ in triples:
        for e in (s, o):
            multi[e] = multi.get(e, 0) + 1
    mono: dict[int, int] = {}
    for i, (_, s, o, _) in enumerate(triples):
        if len(mono) == n_mono:
            break
        if multi[s] >= 2 and multi[o] >= 2:
            mono[i] = len(mono)
            multi[s] -= 1
            multi[o] -= 1
    if len(mono) < n_mono:
        raise ValueError(
            f"mono_share={share} asks for {n_mono} facts stated in one language, but only "
            f"{len(mono)} facts have both entities attested in another fact: lower mono_share"
        )
    return mono

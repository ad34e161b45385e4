"""Planted facts and planted leakage: a corpus whose right answers are known, for judging `trace`.

Each fact is a made-up entity with one relation to a made-up object ("Varo Tesk was born in Quilmar.").
The fact's sentence is planted in ``supports`` documents (the supporting evidence a tracer should find)
and the same entity with another relation and object in ``distractors`` documents (relevant but not
supportive: they name the entity, not the fact), and the same entity with the same relation and another
object in ``same_relation`` documents (hard distractors: they share every word of the fact but its object,
as FASTTRACK's paper builds them). Objects are drawn from a shared list, so an object alone does not point
at its fact. With ``paraphrase`` the query states the fact in other words than the planted sentence ("The
hometown of Varo Tesk is" -> " Quilmar"), so that a tracer cannot find it by copying the sentence's words. Each planted sentence goes into its own background piece at a sentence
boundary, so a planted document reads like the rest of the pool. Leakage: reference examples copied
verbatim into the pool (train-test leakage), each ``copies`` times.

Everything is deterministic from the seed; the returned gold sets index the returned documents.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_SYLLABLES = [
    "ka",
    "ro",
    "mi",
    "tes",
    "var",
    "quil",
    "mor",
    "den",
    "zu",
    "fa",
    "lin",
    "sho",
    "bra",
    "gel",
    "vo",
    "nix",
    "tar",
    "pel",
    "dro",
    "sen",
    "ul",
    "wy",
    "cor",
    "bel",
    "ash",
]
# (relation as a query context ends, object kind): the query is "<entity> <relation>" -> " <object>".
RELATIONS = (
    ("was born in", "place"),
    ("works as a", "job"),
    ("is married to", "person"),
    ("plays the", "instrument"),
    ("founded the company", "company"),
    ("speaks fluent", "language"),
)
_OBJECTS = {
    "place": "Quilmar Ostrava Penlow Darrakesh Velund Corrin Tashkor Elmsby Narvik Sorrento Belcastle Ithra",
    "job": "carpenter surgeon glassblower cartographer beekeeper locksmith tailor astronomer ferrier potter",
    "person": "Mira Olund;Teo Varga;Lise Barran;Anko Pell;Rui Damsa;Cato Wren;Ilse Moor;Bex Tarrin",
    "instrument": "oboe cello harp bassoon sitar lute zither trombone",
    "company": "Norvex Halcyra Brindlewood Quastor Velocor Ambrel Tessaron Kilnworth",
    "language": "Basque Icelandic Tagalog Welsh Amharic Maltese Yoruba Quechua",
}


# A query's wording of each relation that shares no word with the planted sentence's but the entity's.
PARAPHRASES = {
    "was born in": "The hometown of {entity} is",
    "works as a": "By trade, {entity} is a",
    "is married to": "The spouse of {entity} is",
    "plays the": "The instrument {entity} performs on is the",
    "founded the company": "The firm started by {entity} is",
    "speaks fluent": "The tongue {entity} has mastered is",
}


def _objects(kind: str) -> list[str]:
    text = _OBJECTS[kind]
    return text.split(";") if ";" in text else text.split()


@dataclass(frozen=True)
class PlantedFact:
    """One planted fact, its query, and the documents that support it or only mention its entity."""

    id: str
    entity: str
    context: str
    """The query's context: "<entity> <relation>"."""
    target: str
    """The query's target: " <object>"."""
    supporting: tuple[int, ...]
    """Indices (into the returned documents) that state the fact."""
    distractors: tuple[int, ...]
    """Indices that name the entity without the fact (another relation and object)."""
    same_relation: tuple[int, ...] = ()
    """Indices that name the entity and the fact's relation with another object (hard distractors)."""
    query_context: str | None = None
    """The query's context when it paraphrases the fact (None: the planted sentence's own words)."""

    @property
    def sentence(self) -> str:
        return f"{self.context}{self.target}."

    def query(self) -> dict[str, str]:
        return {"id": self.id, "context": self.query_context or self.context, "target": self.target}


@dataclass(frozen=True)
class PlantedLeak:
    """A reference example copied into the pool."""

    id: str
    example: dict
    copies: tuple[int, ...]

    def query(self) -> dict[str, str]:
        return {"id": self.id, **self.example}


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        first = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
        name = f"{first} {last}"
        if name not in used:
            used.add(name)
            return name


def _insert(piece: str, sentence: str, rng: random.Random) -> str:
    """``sentence`` at a sentence boundary of ``piece`` (or at its start when it has none)."""
    cuts = [0] + [i + 2 for i in range(len(piece) - 1) if piece[i] == "." and piece[i + 1] == " "]
    at = rng.choice(cuts)
    return f"{piece[:at]}{sentence} {piece[at:]}".strip()


def plant(
    background: list[str],
    *,
    facts: int,
    supports: int = 3,
    distractors: int = 3,
    leaks: list[dict] | None = None,
    leak_copies: int = 2,
    seed: int = 0,
    same_relation: int = 0,
    paraphrase: bool = False,
) -> tuple[list[str], list[PlantedFact], list[PlantedLeak]]:
    """(documents, facts, leaks): the background pieces with facts and leaks planted, shuffled.

    Every background piece appears once, either as it was or with one planted sentence in it; leaked
    examples are added as documents of their own (``context + target``, or ``text``).
    """
    per_fact = supports + distractors + same_relation
    need = facts * per_fact
    if facts < 1 or supports < 1 or distractors < 0 or same_relation < 0 or leak_copies < 1:
        raise ValueError(
            f"plant: facts={facts}, supports={supports}, distractors={distractors}, same_relation="
            f"{same_relation}, leak_copies={leak_copies}: need facts >= 1, supports >= 1, distractors >= 0, "
            "same_relation >= 0, leak_copies >= 1"
        )
    if need > len(background):
        raise ValueError(
            f"plant: {facts} facts x ({supports} supporting + {distractors} distractor + {same_relation} "
            f"same-relation) documents need "
            f"{need} background pieces, {len(background)} given; give more background or plant fewer facts"
        )
    rng = random.Random(seed)
    docs = list(background)
    hosts = rng.sample(range(len(docs)), need)
    used: set[str] = set()
    planned = []  # (id, entity, context, target, supporting, distractors, same-relation, query context)
    for f in range(facts):
        entity = _name(rng, used)
        rel, kind = rng.choice(RELATIONS)
        obj = rng.choice(_objects(kind))
        other_rel, other_kind = rng.choice([r for r in RELATIONS if r[0] != rel])
        take = hosts[f * per_fact : (f + 1) * per_fact]
        sup, dis, same = (
            take[:supports],
            take[supports : supports + distractors],
            take[supports + distractors :],
        )
        for i in sup:
            docs[i] = _insert(docs[i], f"{entity} {rel} {obj}.", rng)
        for i in dis:
            other = rng.choice([o for o in _objects(other_kind) if o != obj])
            docs[i] = _insert(docs[i], f"{entity} {other_rel} {other}.", rng)
        for i in same:
            other = rng.choice([o for o in _objects(kind) if o != obj])
            docs[i] = _insert(docs[i], f"{entity} {rel} {other}.", rng)
        asked = PARAPHRASES[rel].format(entity=entity) if paraphrase else None
        planned.append((f"fact-{f}", entity, f"{entity} {rel}", f" {obj}", sup, dis, same, asked))
    leak_plan = []
    for j, ex in enumerate(leaks or []):
        text = ex["context"] + ex["target"] if "target" in ex else ex["text"]
        start = len(docs)
        docs += [text] * leak_copies
        leak_plan.append((f"leak-{j}", ex, list(range(start, start + leak_copies))))
    order = list(range(len(docs)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}

    def moved(idx):
        return tuple(sorted(where[i] for i in idx))

    out_facts = [
        PlantedFact(fid, ent, ctx, tgt, moved(sup), moved(dis), moved(same), asked)
        for fid, ent, ctx, tgt, sup, dis, same, asked in planned
    ]
    out_leaks = [PlantedLeak(lid, ex, moved(idx)) for lid, ex, idx in leak_plan]
    return [docs[i] for i in order], out_facts, out_leaks

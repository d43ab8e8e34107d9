"""Invented documents with questions whose answers are in them.

No reading-comprehension set is reachable offline, and answering from memory must be learnt on
facts the base model cannot know: every document here is drawn from a seeded generator (people,
places, organisations and events with invented names, years and numbers), so a right answer can
only come from reading the document. Each document is a function of its index and seed; the
train/held-out split is by document (different seeds), exactly as the corpus is split.

The sentences come in several phrasings per fact and in varied order, and documents carry
filler sentences without facts, so that the decoder learns to find an answer rather than a slot
position.
No name in the pools occurs in the demo documents (icmem/data): the demo must be answered by
reading memory, not from names met in training (tested).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

_FIRST = [
    "Ambrose",
    "Isolde",
    "Winifred",
    "Cedric",
    "Elena",
    "Victor",
    "Ingrid",
    "Felix",
    "Harriet",
    "Oskar",
    "Lucia",
    "Bram",
    "Miriam",
    "Conrad",
    "Greta",
    "Anselm",
    "Rosalind",
    "Idris",
    "Nadia",
    "Piers",
    "Vera",
    "Ludo",
    "Sabine",
    "Emrys",
    "Clara",
    "Hugo",
    "Petra",
    "Jonas",
    "Ottilie",
    "Marek",
    "Leona",
    "Casimir",
    "Freya",
    "Tomas",
    "Iris",
    "Dorian",
    "Esme",
    "Rafael",
    "Agnes",
    "Linus",
    "Mabel",
    "Teodor",
    "Wilma",
    "Cyrus",
    "Hedda",
    "Quentin",
    "Sylvie",
    "Barnaby",
    "Thea",
    "Emil",
    "Juno",
    "Gideon",
    "Lotte",
    "Silas",
    "Maren",
]
_LAST = [
    "Quennell",
    "Garrow",
    "Halloran",
    "Voss",
    "Abernethy",
    "Kestrel",
    "Marlow",
    "Quill",
    "Thorne",
    "Ashdown",
    "Brannock",
    "Corvin",
    "Dunmore",
    "Elphick",
    "Farrow",
    "Gilchrist",
    "Harrowgate",
    "Ingleby",
    "Jessop",
    "Dunhallow",
    "Lomax",
    "Mereweather",
    "Nettleship",
    "Orrin",
    "Penhallow",
    "Radley",
    "Sallow",
    "Tregarth",
    "Underhill",
    "Vantreight",
    "Whitlock",
    "Yarrow",
    "Ambler",
    "Blackwood",
    "Castellan",
    "Dovecote",
    "Embry",
    "Fenwick",
    "Grisewood",
    "Holloway",
    "Ivers",
    "Juniper",
    "Kettering",
]
_SYLLABLES = [
    "bar",
    "dun",
    "kel",
    "mor",
    "ash",
    "wick",
    "tal",
    "bren",
    "cor",
    "fen",
    "hal",
    "lin",
    "mar",
    "nor",
    "pen",
    "ros",
    "sel",
    "tor",
    "val",
    "wen",
    "ard",
    "bry",
    "cal",
    "dor",
    "eth",
    "gar",
    "hol",
    "ister",
    "lan",
    "mir",
    "nes",
    "ovan",
    "quar",
    "rith",
    "sto",
    "ulm",
    "ver",
    "yen",
    "zan",
]
_PLACE_SUFFIX = ("ford", "haven", "mouth", "bridge", "stead", "wick", "by", "holm", "field", "port")
_JOBS = (
    "clockmaker",
    "glassblower",
    "cartographer",
    "beekeeper",
    "bookbinder",
    "shipwright",
    "astronomer",
    "apothecary",
    "surveyor",
    "organ builder",
    "lighthouse keeper",
    "botanist",
    "printer",
    "weaver",
    "potter",
    "bell founder",
    "ferryman",
    "schoolteacher",
    "violin maker",
)
_THINGS = (
    "barometer",
    "loom",
    "telescope",
    "lantern",
    "water pump",
    "printing press",
    "sextant",
    "music box",
    "sundial",
    "bicycle",
    "kiln",
    "windmill",
    "diving bell",
    "rain gauge",
)
_PRODUCTS = (
    "copper kettles",
    "wool blankets",
    "pocket watches",
    "rope",
    "glass bottles",
    "paper",
    "bicycles",
    "pianos",
    "candles",
    "soap",
    "boots",
    "maps",
    "tiles",
    "umbrellas",
)
_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "grey", "purple", "orange")
_ANIMALS = ("heron", "fox", "otter", "stag", "raven", "badger", "hare", "swan", "wolf", "owl")
_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_FILLER = (
    "The weather that year was unusually mild.",
    "Few records from the period survive.",
    "Visitors often remarked on the quiet of the place.",
    "Much of this was written down only many years later.",
    "Local newspapers gave the matter little attention at the time.",
    "The roads in the region were poor and often flooded in winter.",
    "Letters from the period describe a slow and careful way of working.",
    "Some details of the story are still disputed by historians.",
    "The surrounding land was mostly farmland and woods.",
    "A small museum now keeps a few objects from those days.",
)


@dataclass(frozen=True)
class InventedQuestion:
    question: str
    answer: str


@dataclass(frozen=True)
class InventedDocument:
    """A document and questions about it; `name` is unique per (seed, index)."""

    name: str
    title: str
    text: str
    questions: tuple[InventedQuestion, ...]


def _place(rng: random.Random) -> str:
    stem = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2))))
    return (stem + rng.choice(_PLACE_SUFFIX)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _number_word(n: int) -> str:
    words = [
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
    ]
    return words[n - 2] if 2 <= n <= 12 else str(n)


def _pick(rng: random.Random, *options: str) -> str:
    return rng.choice(options)


def _biography(rng: random.Random) -> tuple[str, list[str], list[InventedQuestion]]:
    person, town, spouse = _person(rng), _place(rng), _person(rng)
    first = person.split()[0]
    last = person.split()[1]
    job = rng.choice(_JOBS)
    born = rng.randrange(1790, 1960)
    moved = born + rng.randrange(18, 35)
    city = _place(rng)
    children = rng.randrange(2, 7)
    thing = rng.choice(_THINGS)
    invented = moved + rng.randrange(3, 20)
    award_town = _place(rng)
    facts = [
        _pick(
            rng,
            f"{person} was born in {born} in the town of {town}.",
            f"Born in {town} in {born}, {person} grew up near the harbour.",
            f"{person} came into the world in {born}, in a small house in {town}.",
        ),
        _pick(
            rng,
            f"{last} trained as a {job} and moved to {city} in {moved}.",
            f"In {moved} {first} left for {city}, where {last} worked as a {job}.",
            f"By {moved} {last} was working as a {job} in the city of {city}.",
        ),
        _pick(
            rng,
            f"{first} married {spouse}, and they had {_number_word(children)} children.",
            f"{last}'s marriage to {spouse} produced {_number_word(children)} children.",
        ),
        _pick(
            rng,
            f"In {invented} {last} built an improved {thing} that was copied across {city}.",
            f"{last} is best remembered for a new kind of {thing}, first shown in {invented}.",
        ),
        _pick(
            rng,
            f"The guild of {award_town} later gave {first} a silver medal.",
            f"A silver medal from the guild of {award_town} followed some years later.",
        ),
    ]
    questions = [
        InventedQuestion(f"In which town was {person} born?", town),
        InventedQuestion(f"In what year was {person} born?", str(born)),
        InventedQuestion(f"What was {person}'s trade?", job),
        InventedQuestion(f"Where did {person} move to in {moved}?", city),
        InventedQuestion(f"Who did {person} marry?", spouse),
        InventedQuestion(f"What did {person} build or improve?", thing),
        InventedQuestion(f"Which town's guild gave {person} a silver medal?", award_town),
    ]
    return f"The life of {person}", facts, questions


def _organisation(rng: random.Random) -> tuple[str, list[str], list[InventedQuestion]]:
    founder, city = _person(rng), _place(rng)
    product = rng.choice(_PRODUCTS)
    name = f"{rng.choice(_LAST)} & {rng.choice(_LAST)}"
    founded = rng.randrange(1750, 1990)
    workers = rng.randrange(12, 900)
    river = _place(rng).replace("ford", "").replace("port", "") + " River"
    successor = _person(rng)
    closed = founded + rng.randrange(20, 90)
    colour = rng.choice(_COLOURS)
    facts = [
        _pick(
            rng,
            f"The firm of {name} was founded in {founded} by {founder} in {city}.",
            f"{founder} started {name} in {city} in {founded}.",
            f"In {founded}, {founder} opened the workshop of {name} in {city}.",
        ),
        _pick(
            rng,
            f"It made {product}, and at its height it employed {workers} people.",
            f"{name} was known for its {product}; {workers} workers were on its books.",
        ),
        _pick(
            rng,
            f"The works stood on the banks of the {river}.",
            f"Its buildings lined the {river}, which carried the goods to the coast.",
        ),
        _pick(
            rng,
            f"After the founder's death the business passed to {successor}.",
            f"{successor} took over the firm when {founder} died.",
        ),
        _pick(
            rng,
            f"Its wagons were painted {colour}, and the firm closed in {closed}.",
            f"The firm, whose {colour} wagons were seen everywhere, shut its doors in {closed}.",
        ),
    ]
    questions = [
        InventedQuestion(f"Who founded {name}?", founder),
        InventedQuestion(f"In what year was {name} founded?", str(founded)),
        InventedQuestion(f"In which city was {name} founded?", city),
        InventedQuestion(f"What did {name} make?", product),
        InventedQuestion(f"How many people did {name} employ at its height?", str(workers)),
        InventedQuestion(f"Who took over {name} after the founder died?", successor),
        InventedQuestion(f"What colour were the wagons of {name}?", colour),
        InventedQuestion(f"When did {name} close?", str(closed)),
    ]
    return f"The history of {name}", facts, questions


def _town(rng: random.Random) -> tuple[str, list[str], list[InventedQuestion]]:
    town, mayor = _place(rng), _person(rng)
    population = rng.randrange(300, 40000)
    month = rng.choice(_MONTHS)
    animal = rng.choice(_ANIMALS)
    bridges = rng.randrange(2, 12)
    weekday = rng.choice(_WEEKDAYS)
    hill = _place(rng).replace("haven", "").replace("mouth", "") + " Hill"
    facts = [
        _pick(
            rng,
            f"{town} is a market town of about {population} people.",
            f"About {population} people live in {town}.",
        ),
        _pick(
            rng,
            f"Its mayor is {mayor}, elected after a close vote.",
            f"The town is led by its mayor, {mayor}.",
        ),
        _pick(
            rng,
            f"Every {month} the town holds a festival in honour of the {animal} on its crest.",
            f"The {animal} on the town's crest is celebrated each {month} with a festival.",
        ),
        _pick(
            rng,
            f"The river through {town} is crossed by {_number_word(bridges)} bridges.",
            f"{town} has {_number_word(bridges)} bridges over its river.",
        ),
        _pick(
            rng,
            f"The market is held every {weekday} at the foot of {hill}.",
            f"On {weekday}s traders gather below {hill} for the weekly market.",
        ),
    ]
    questions = [
        InventedQuestion(f"Who is the mayor of {town}?", mayor),
        InventedQuestion(f"How many people live in {town}?", str(population)),
        InventedQuestion(f"In which month does {town} hold its festival?", month),
        InventedQuestion(f"Which animal is on the crest of {town}?", animal),
        InventedQuestion(f"On which day of the week is the market in {town} held?", weekday),
        InventedQuestion(f"At the foot of which hill is the market of {town}?", hill),
    ]
    return f"{town}", facts, questions


def _expedition(rng: random.Random) -> tuple[str, list[str], list[InventedQuestion]]:
    leader, ship = (
        _person(rng),
        f"{rng.choice(_COLOURS).capitalize()} {rng.choice(_ANIMALS).capitalize()}",
    )
    year = rng.randrange(1700, 1980)
    crew = rng.randrange(8, 120)
    island = _place(rng) + " Island"
    days = rng.randrange(20, 400)
    found = rng.choice(_THINGS + _PRODUCTS)
    navigator = _person(rng)
    facts = [
        _pick(
            rng,
            f"In {year} {leader} sailed on the ship {ship} with a crew of {crew}.",
            f"{leader} led an expedition in {year} aboard the {ship}, with {crew} crew.",
        ),
        _pick(
            rng,
            f"The voyage aimed for {island} and lasted {days} days.",
            f"It took {days} days to reach {island} and come home.",
        ),
        _pick(
            rng,
            f"The navigator, {navigator}, kept the charts.",
            f"Charts were kept by the navigator {navigator}.",
        ),
        _pick(
            rng,
            f"On the island the crew found an old {found} buried in the sand.",
            f"The most famous find of the voyage was an old {found}.",
        ),
    ]
    questions = [
        InventedQuestion(f"Who led the expedition aboard the {ship}?", leader),
        InventedQuestion(f"In what year did {leader} sail?", str(year)),
        InventedQuestion(f"How many crew sailed with {leader}?", str(crew)),
        InventedQuestion(f"Which island did {leader}'s expedition aim for?", island),
        InventedQuestion(f"How many days did {leader}'s voyage last?", str(days)),
        InventedQuestion(f"Who was the navigator of {leader}'s expedition?", navigator),
        InventedQuestion(f"What did {leader}'s crew find on the island?", found),
    ]
    return f"The voyage of the {ship}", facts, questions


_GENRES: tuple[Callable[[random.Random], tuple[str, list[str], list[InventedQuestion]]], ...] = (
    _biography,
    _organisation,
    _town,
    _expedition,
)


def invented_document(index: int, seed: int = 0) -> InventedDocument:
    """Document `index` of the stream `seed`: the same arguments give the same document."""
    rng = random.Random(f"invented:{seed}:{index}")
    title, facts, questions = rng.choice(_GENRES)(rng)
    body = facts[:1] + rng.sample(facts[1:], len(facts) - 1)
    for _ in range(rng.randrange(0, 4)):
        body.insert(rng.randrange(1, len(body) + 1), rng.choice(_FILLER))
    text = f"{title}\n\n" + " ".join(body)
    return InventedDocument(f"invented-{seed}-{index}", title, text, tuple(questions))


def invented_documents(count: int, seed: int = 0) -> list[InventedDocument]:
    return [invented_document(i, seed) for i in range(count)]

"""The built-in task of ``deltatune train``: turn a sentence about a person into a JSON record.

Written by us (seeded generator, no copied data). SmolLM2-135M-Instruct answers in prose or with
the wrong keys; a LoRA adapter trained for a couple of minutes answers with exact JSON, so the
before/after exact-match score shows at a glance that fine-tuning worked.
"""

from __future__ import annotations

import json
import random

from deltatune.data import Example

INSTRUCTION = 'Extract the person as JSON with keys "name", "age", "job", "city".'
FIRST = [
    "Maria",
    "Tom",
    "Aisha",
    "Kenji",
    "Lena",
    "Omar",
    "Sofia",
    "Ivan",
    "Chloe",
    "Ravi",
    "Nora",
    "Diego",
    "Emma",
    "Yusuf",
    "Hana",
    "Pablo",
    "Greta",
    "Liam",
    "Zara",
    "Felix",
    "Mei",
    "Arjun",
    "Ines",
    "Noah",
]
LAST = [
    "Lopez",
    "Becker",
    "Khan",
    "Sato",
    "Novak",
    "Haddad",
    "Rossi",
    "Petrov",
    "Martin",
    "Iyer",
    "Berg",
    "Silva",
    "Clark",
    "Demir",
    "Kim",
    "Garcia",
    "Larsen",
    "Walsh",
    "Ali",
    "Wagner",
    "Chen",
    "Patel",
]
JOBS = [
    "nurse",
    "pilot",
    "teacher",
    "baker",
    "engineer",
    "lawyer",
    "farmer",
    "painter",
    "chemist",
    "plumber",
    "librarian",
    "dentist",
    "architect",
    "journalist",
    "carpenter",
    "pharmacist",
    "translator",
    "geologist",
]
CITIES = [
    "Lisbon",
    "Oslo",
    "Cairo",
    "Osaka",
    "Lima",
    "Quebec",
    "Nairobi",
    "Prague",
    "Dublin",
    "Seoul",
    "Austin",
    "Porto",
    "Krakow",
    "Hanoi",
    "Bergen",
    "Accra",
    "Perth",
    "Tunis",
    "Leeds",
    "Cusco",
    "Zagreb",
    "Malmo",
]
TEMPLATES = [
    "{name} is a {age}-year-old {job} who lives in {city}.",
    "Meet {name}, {age}, a {job} based in {city}.",
    "In {city}, {name} has worked as a {job} since turning {started}; {name} is now {age}.",
    "{name} ({age}) moved to {city} last year to work as a {job}.",
    "Our new {job} is {name} from {city}, aged {age}.",
    "At {age}, {name} is the best-known {job} in {city}.",
    "{city} resident {name}, a {job}, celebrated turning {age} this week.",
    "The {job} {name}, {age} years old, grew up in {city} and never left.",
]


def make_record(rng: random.Random) -> dict:
    return {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "age": rng.randint(21, 79),
        "job": rng.choice(JOBS),
        "city": rng.choice(CITIES),
    }


def make_examples(count: int, seed: int) -> list[Example]:
    """``count`` sentence -> JSON examples; the same seed gives the same examples."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        record = make_record(rng)
        sentence = rng.choice(TEMPLATES).format(**record, started=record["age"] - rng.randint(2, 9))
        examples.append(Example(prompt=f"{INSTRUCTION}\n\n{sentence}", target=json.dumps(record)))
    return examples


def exact_match(prediction: str, reference: str) -> bool:
    """The prediction parses as JSON (after stripping whitespace) and equals the reference record."""
    try:
        return json.loads(prediction.strip()) == json.loads(reference)
    except (json.JSONDecodeError, ValueError):
        return False

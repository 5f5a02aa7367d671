"""Deterministic, offline long-context tasks with several questions per context.

Every generator takes a seeded ``random.Random`` and a target length (in tokens, measured by a
``count_tokens`` callable, by default a 4-characters-per-token estimate) and returns a :class:`Sample`:
one context and several questions about different parts of it. That shape is what the multi-query
protocol needs: the context is compressed once and every question is asked on the same compressed
cache, so a method that keeps only what the first question needed loses the others.

No data is downloaded: the filler text is assembled from the small word lists below, so a context is a
pure function of (task, seed, length, counter). The facts are short and explicit on purpose:
SmolLM2-135M must answer them with the full cache for the comparison to mean anything.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

CountTokens = Callable[[str], int]


def approx_tokens(text: str) -> int:
    """A tokenizer-free length estimate (English prose runs about 4 characters per BPE token)."""
    return max(1, len(text) // 4)


@dataclass(frozen=True)
class Question:
    """One question on a context; ``answers`` lists the accepted strings (any one counts)."""

    prompt: str
    answers: tuple
    kind: str = ""
    # The start of the assistant's reply (RULER's answer prefix): the model continues it with the value,
    # so a few tokens suffice and a small model does not wander into restating the question.
    answer_prefix: str = ""
    max_new_tokens: int = 8


@dataclass
class Sample:
    task: str
    index: int
    context: str
    questions: List[Question]
    meta: Dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Filler text: plausible, fact-free sentences so that the planted facts are the only answers.

_SUBJECTS = ["The river", "An old farmer", "The morning train", "A quiet library", "The village baker",
             "A tall lighthouse", "The harbour crane", "A wandering poet", "The school choir", "A grey heron",
             "The market square", "A young painter", "The mountain road", "A small ferry", "The city clock"]
_VERBS = ["drifted past", "waited near", "looked over", "moved along", "rested beside", "circled around",
          "leaned toward", "passed under", "stood behind", "followed"]
_OBJECTS = ["the stone bridge", "the empty fields", "a row of chestnut trees", "the northern hills",
            "the foggy harbour", "a field of sunflowers", "the old mill", "the wooden pier",
            "a narrow canal", "the sleeping town", "the pine forest", "a line of fishing boats"]
_TIMES = ["in the early morning", "at dusk", "after a long rain", "on a windy afternoon", "before the storm",
          "during the harvest", "late in the evening", "on a clear day", "as the bells rang", "in late autumn"]


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TIMES)}."


def _grow(rng: random.Random, base_items: List[str], target_tokens: int, count_tokens: CountTokens,
          make_filler: Callable[[random.Random], str], sep: str = " ") -> List[str]:
    """Insert filler items at random positions between ``base_items`` until the text reaches the target.

    The base items keep their relative order. Each round adds about the number of fillers the missing
    length needs (estimated from the current tokens per item), so the count is measured a few times
    rather than once per sentence and the result overshoots the target by at most a few sentences.
    """
    items = list(base_items)
    while True:
        have = count_tokens(sep.join(items))
        if have >= target_tokens:
            return items
        # Size the round from one throwaway filler (its own rng: the sample's stream stays untouched);
        # planted items can be much shorter than a filler, so the running average would overshoot.
        per_item = max(1.0, count_tokens(make_filler(random.Random(len(items)))))
        for _ in range(max(1, int((target_tokens - have) / per_item * 0.9))):
            items.insert(rng.randint(0, len(items)), make_filler(rng))


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _distinct(rng: random.Random, pool: List[str], n: int) -> List[str]:
    if n > len(pool):
        raise ValueError(f"asked for {n} distinct items from a pool of {len(pool)}")
    return rng.sample(pool, n)


_CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dublin", "Cairo", "Perth", "Tbilisi",
           "Bogota", "Kyoto", "Porto", "Vienna", "Dakar", "Manila", "Zagreb", "Austin", "Geneva", "Madras"]


def _needle_sample(rng: random.Random, task: str, facts, target_tokens: int, count_tokens: CountTokens) -> Sample:
    """Plant ``facts`` = [(sentence, question, answer prefix, answer, kind, answer tokens)] in filler prose."""
    text = " ".join(_grow(rng, [f[0] for f in facts], target_tokens, count_tokens, filler_sentence))
    questions = [Question(q, (a,), kind, prefix, budget) for _, q, prefix, a, kind, budget in facts]
    return Sample(task, 0, text, questions, {"needles": len(facts)})


def multi_needle(rng: random.Random, target_tokens: int, n_questions: int = 4,
                 count_tokens: CountTokens = approx_tokens) -> Sample:
    """Needle-in-a-haystack with several needles: 'The special magic number for <city> is <n>.'"""
    cities = _distinct(rng, _CITIES, n_questions)
    facts = [(f"The special magic number for {c} is {n}.", f"What is the special magic number for {c}?",
              f"The special magic number for {c} is", n, "needle", 7) for c, n in ((c, _number(rng, 5)) for c in cities)]
    return _needle_sample(rng, "needle", facts, target_tokens, count_tokens)


def _hex_id(rng: random.Random, n: int = 8) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def kv_retrieval(rng: random.Random, target_tokens: int, n_questions: int = 4,
                 count_tokens: CountTokens = approx_tokens) -> Sample:
    """SCBench Retr.KV style: a JSON object of random ids; each question asks one key's value.

    The object is all signal (no prose), so every pair is a potential answer and a query-agnostic
    method has nothing to discard for free.
    """
    pairs: Dict[str, str] = {}

    def body() -> str:
        return "{" + ", ".join(f'"{k}": "{v}"' for k, v in pairs.items()) + "}"

    while count_tokens("JSON data: " + body()) < target_tokens:
        pairs[_hex_id(rng)] = _hex_id(rng)
    keys = list(pairs)
    asked = _distinct(rng, keys, min(n_questions, len(keys)))
    questions = [Question(f'In the JSON data, what is the value of the key "{k}"?', (pairs[k],), "kv",
                          f'The value of the key "{k}" is "', 10) for k in asked]
    return Sample("kv_retrieval", 0, "JSON data: " + body(), questions, {"pairs": len(pairs)})


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def variable_tracking(rng: random.Random, target_tokens: int, n_questions: int = 4, hops: int = 2,
                      count_tokens: CountTokens = approx_tokens) -> Sample:
    """RULER-style variable tracking: chains 'VAR A = 12345.' ... 'VAR B = VAR A.' scattered in filler.

    Each question follows one chain from its last variable: the answer needs ``hops`` statements that
    sit far apart, which a method keeping only one of them loses.
    """
    names: List[str] = []
    while len(names) < n_questions * hops:
        name = _var_name(rng)
        if name not in names:
            names.append(name)
    statements: List[str] = []
    questions: List[Question] = []
    for i in range(n_questions):
        chain = names[i * hops:(i + 1) * hops]
        value = _number(rng, 5)
        statements.append(f"VAR {chain[0]} = {value}.")
        statements.extend(f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:]))
        questions.append(Question(f"What is the numeric value of VAR {chain[-1]}?", (value,), "vt",
                                  f"The numeric value of VAR {chain[-1]} is", 7))
    # Interleave the chains while keeping each chain's statements in order.
    order = [i for i in range(n_questions) for _ in range(hops)]
    rng.shuffle(order)
    per_chain = [statements[i * hops:(i + 1) * hops] for i in range(n_questions)]
    ordered = [per_chain[i].pop(0) for i in order]
    text = " ".join(_grow(rng, ordered, target_tokens, count_tokens, filler_sentence))
    return Sample("var_tracking", 0, text, questions, {"chains": n_questions, "hops": hops})


_FIRST = ["Alice", "Bruno", "Chen", "Daria", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi",
          "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq"]
_LAST = ["Moreno", "Okafor", "Lindqvist", "Tanaka", "Novak", "Haddad", "Silva", "Kowalski", "Ng", "Berg"]
_COLOURS = ["teal", "crimson", "amber", "violet", "olive", "indigo", "coral", "maroon", "silver", "ochre"]


def fact_directory(rng: random.Random, target_tokens: int, n_questions: int = 4,
                   count_tokens: CountTokens = approx_tokens) -> Sample:
    """A staff directory: one line per person with office city, phone extension and favourite colour.

    Questions ask different attributes of different people, the setting where a cache compressed for
    one question (the first) is most likely to have dropped what the next one needs.
    """
    people: List[str] = []
    lines: List[str] = []
    facts: List[Dict[str, str]] = []
    while count_tokens("\n".join(lines)) < target_tokens and len(people) < len(_FIRST) * len(_LAST):
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if name in people:
            continue
        people.append(name)
        fact = {"name": name, "city": rng.choice(_CITIES), "ext": _number(rng, 4), "colour": rng.choice(_COLOURS)}
        facts.append(fact)
        lines.append(f"{name} works in the {fact['city']} office; phone extension {fact['ext']}; "
                     f"favourite colour {fact['colour']}. {filler_sentence(rng)}")
    chosen = _distinct(rng, facts, min(n_questions, len(facts)))
    # (attribute, question, answer prefix, answer tokens)
    templates = [("ext", "What is the phone extension of {name}?", "The phone extension of {name} is", 6),
                 ("city", "In which city does {name} work?", "{name} works in the", 4),
                 ("colour", "What is the favourite colour of {name}?", "The favourite colour of {name} is", 4)]
    questions = []
    for i, fact in enumerate(chosen):
        attr, template, prefix, budget = templates[i % len(templates)]
        questions.append(Question(template.format(name=fact["name"]), (fact[attr],), f"dir_{attr}",
                                  prefix.format(name=fact["name"]), budget))
    return Sample("fact_directory", 0, "Staff directory:\n" + "\n".join(lines), questions, {"people": len(people)})


_LABELS = ["red", "blue", "green", "yellow", "orange", "purple", "black", "white", "golden", "silver",
           "north", "south", "east", "west", "iron", "copper", "glass", "marble", "cedar", "oak"]


def passkey(rng: random.Random, target_tokens: int, n_questions: int = 4,
            count_tokens: CountTokens = approx_tokens) -> Sample:
    """RULER's passkey, keyed so one context carries several: 'The pass key of the red vault is 48213.
    Remember it.' in filler prose; each question asks a different vault's key."""
    labels = _distinct(rng, _LABELS, n_questions)
    facts = [(f"The pass key of the {c} vault is {k}. Remember it.", f"What is the pass key of the {c} vault?",
              f"The pass key of the {c} vault is", k, "passkey", 7) for c, k in ((c, _number(rng, 5)) for c in labels)]
    return _needle_sample(rng, "passkey", facts, target_tokens, count_tokens)


_WORDS = ["umbrella", "pineapple", "telescope", "volcano", "penguin", "saxophone", "cactus", "lantern",
          "dolphin", "avocado", "compass", "giraffe", "harmonica", "iceberg", "kangaroo", "lemonade",
          "mushroom", "octopus", "parachute", "raccoon", "scarecrow", "tornado", "walrus", "zeppelin"]


def word_needle(rng: random.Random, target_tokens: int, n_questions: int = 4,
                count_tokens: CountTokens = approx_tokens) -> Sample:
    """Keyed word needles: "Priya Novak's secret word is penguin." in filler; the answer is a word, not a
    number, so the task checks that a method keeps a whole distinctive fact (name and word)."""
    people: List[str] = []
    while len(people) < n_questions:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if name not in people:
            people.append(name)
    words = _distinct(rng, _WORDS, n_questions)
    facts = [(f"{p}'s secret word is {w}.", f"What is {p}'s secret word?", f"{p}'s secret word is", w, "word", 5)
             for p, w in zip(people, words)]
    return _needle_sample(rng, "word_needle", facts, target_tokens, count_tokens)


def _mixed_facts(rng: random.Random, n: int):
    """n (needle sentence, question, answer prefix, answer, kind, answer tokens) of DIFFERENT shapes."""
    city, label = rng.choice(_CITIES), rng.choice(_LABELS)
    person = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    # (The secret-word shape of word_needle was tried here first: SmolLM2 invents a name for it.)
    num, key, room = _number(rng, 5), _number(rng, 5), _number(rng, 3)
    colour, animal_owner = rng.choice(_COLOURS), rng.choice(_FIRST)
    pet = rng.choice(["parrot", "hamster", "tortoise", "ferret", "goldfish", "rabbit"])
    facts = [
        (f"The special magic number for {city} is {num}.", f"What is the special magic number for {city}?",
         f"The special magic number for {city} is", num, "needle", 7),
        (f"The pass key of the {label} vault is {key}. Remember it.", f"What is the pass key of the {label} vault?",
         f"The pass key of the {label} vault is", key, "passkey", 7),
        (f"{person} lives in room {room}.", f"Which room does {person} live in?", f"{person} lives in room",
         room, "room", 5),
        (f"The front door of the museum is painted {colour}.", "What colour is the front door of the museum?",
         "The front door of the museum is painted", colour, "colour", 4),
        (f"{animal_owner}'s pet is a {pet}.", f"What kind of animal is {animal_owner}'s pet?",
         f"{animal_owner}'s pet is a", pet, "pet", 4),
    ]
    if n > len(facts):
        raise ValueError(f"mixed_needle has {len(facts)} fact shapes; asked for {n} questions")
    return rng.sample(facts, n)


def mixed_needle(rng: random.Random, target_tokens: int, n_questions: int = 4,
                 count_tokens: CountTokens = approx_tokens) -> Sample:
    """Several needles of DIFFERENT shapes (a magic number, a vault pass key, a room number, a door colour,
    a pet) in filler: each question's key phrase occurs once in the context, so a small model does not
    confuse needles of the same template, and each question depends on a different place."""
    return _needle_sample(rng, "mixed_needle", _mixed_facts(rng, n_questions), target_tokens, count_tokens)


TASKS: Dict[str, Callable[..., Sample]] = {
    "needle": multi_needle,
    "mixed_needle": mixed_needle,
    "passkey": passkey,
    "word_needle": word_needle,
    "kv_retrieval": kv_retrieval,
    "var_tracking": variable_tracking,
    "fact_directory": fact_directory,
}


def make_samples(task: str, n_contexts: int, target_tokens: int, n_questions: int, seed: int = 0,
                 count_tokens: Optional[CountTokens] = None,
                 keep_index: Optional[Callable[[int], bool]] = None) -> List[Sample]:
    """``n_contexts`` samples of one task; sample i depends only on (task, seed, i, length, questions).

    ``keep_index`` (optional) selects which of the indices 0..n_contexts-1 to generate (a shard of a run):
    the others are skipped, not generated, and the kept ones are the same as in the whole run.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    count = count_tokens or approx_tokens
    samples = []
    for i in range(n_contexts):
        if keep_index is not None and not keep_index(i):
            continue
        # A string seed is hashed deterministically by random.Random (unlike hash(), which is salted).
        rng = random.Random(f"{task}/{seed}/{i}")
        sample = TASKS[task](rng, target_tokens, n_questions=n_questions, count_tokens=count)
        sample.index = i
        samples.append(sample)
    return samples

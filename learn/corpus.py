"""The built-in synthetic corpus: tasks, their answers, a held-out split, and answer checking.

loopchat must make its own model offline, and its learning loop needs users whose rankings
carry signal. Both come from here: small conversational tasks (greetings, sums, differences,
products, facts from a built-in table, spelling, letter counting, short descriptions, and
follow-ups such as "And plus 5?" that only make sense with the earlier turns), each answerable
in several styles (brief, plain, polite, verbose), so sampled answers differ in correctness,
length and politeness.

One parser reads the user's turns back (``solve``): ``check_answer`` uses it to know what the
right answer to any conversation is, so simulated users can judge answers to prompts they did
not generate themselves. Generation and parsing share the same phrasings, and a test checks
that they agree.

Held-out split: every question has a key (the operand pair of a sum, the phrasing and entity of
a fact, the word of a spelling); a stable hash of it puts ~10% of keys in ``heldout``. Training
text and demonstrations use only ``train`` keys, so the benchmark measures answers the model
never saw.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

STYLES = ("brief", "plain", "polite", "verbose")
HELDOUT_PERCENT = 10
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are loopchat, a small helpful assistant.",
    "Answer the user's questions.",
)

# --- the built-in tables -------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "China": "Beijing", "Egypt": "Cairo", "Canada": "Ottawa",
    "Brazil": "Brasilia", "Russia": "Moscow", "India": "New Delhi", "Kenya": "Nairobi",
    "Peru": "Lima", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Poland": "Warsaw", "Portugal": "Lisbon", "Ireland": "Dublin", "Mexico": "Mexico City",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Turkey": "Ankara",
    "Austria": "Vienna", "Cuba": "Havana", "Chile": "Santiago", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Thailand": "Bangkok", "Hungary": "Budapest",
}  # fmt: skip
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow",
    "a tomato": "red", "coal": "black", "an orange": "orange", "chocolate": "brown",
    "a lemon": "yellow", "milk": "white", "a frog": "green", "blood": "red",
    "the sea": "blue", "a flamingo": "pink", "an elephant": "grey", "a crow": "black",
}  # fmt: skip
SOUNDS = {
    "a cow": "moo", "a dog": "woof", "a cat": "meow", "a duck": "quack", "a sheep": "baa",
    "a lion": "roar", "a snake": "hiss", "an owl": "hoot", "a horse": "neigh",
    "a pig": "oink", "a bee": "buzz", "a mouse": "squeak", "a donkey": "hee-haw",
    "a rooster": "cock-a-doodle-doo", "a wolf": "howl", "a bird": "tweet",
}  # fmt: skip
# entity -> (one short sentence, one more sentence, the keyword a right answer must contain)
DESCRIPTIONS = {
    "the sun": ("The sun is the star at the centre of our solar system.",
                "It gives the Earth light and heat.", "star"),
    "the moon": ("The moon is a rocky body that orbits the Earth.",
                 "It shines at night by reflecting sunlight.", "orbits"),
    "a cat": ("A cat is a small furry animal that people keep as a pet.",
              "Cats like to sleep and to chase mice.", "pet"),
    "a tree": ("A tree is a tall plant with a wooden trunk and leaves.",
               "Trees give us shade, fruit and wood.", "plant"),
    "rain": ("Rain is water that falls from clouds.",
             "Plants need rain to grow.", "water"),
    "a bicycle": ("A bicycle is a vehicle with two wheels that you pedal.",
                  "Riding one is good exercise.", "wheels"),
    "a book": ("A book is a set of printed pages bound together to read.",
               "Books can tell stories or teach facts.", "pages"),
    "the ocean": ("The ocean is a huge body of salt water.",
                  "It covers most of the Earth.", "salt"),
    "a computer": ("A computer is a machine that follows programs to process data.",
                   "It can do billions of steps each second.", "machine"),
    "bread": ("Bread is a food baked from flour and water.",
              "It is eaten all over the world.", "flour"),
    "a piano": ("A piano is a musical instrument played with keys.",
                "It can play many notes at once.", "instrument"),
    "winter": ("Winter is the coldest season of the year.",
               "In many places it snows in winter.", "coldest"),
}  # fmt: skip
WORDS = """
cat dog sun moon tree book house apple water river green happy music table chair bread
light night hello world paper pencil window garden flower orange banana yellow purple
school friend family summer winter spring autumn cloud storm rain snow horse mouse bird
fish ocean island forest mountain valley desert bridge castle king queen robot rocket
planet star dream smile laugh dance sing write read carrot potato tomato lemon cherry
grape melon honey sugar salt pepper butter cheese pizza pasta rice soup coffee tea juice
milk egg chicken tiger lion zebra monkey rabbit turtle snake eagle whale shark dolphin
jacket shoe sock glove hat ring clock phone camera guitar piano drum violin ball game
puzzle letter number circle square triangle city street road train plane boat car
""".split()

# --- templates ------------------------------------------------------------------------------

# Question phrasings per form. Slots: {a} {b} {n} numbers, {x} a table entity, {w} a word,
# {c} a letter. Each phrasing is also a pattern that ``solve`` matches user turns against.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "add": ("What is {a} + {b}?", "What is {a} plus {b}?", "What's {a} + {b}?",
            "Add {a} and {b}.", "Compute {a} + {b}.", "{a} + {b} = ?",
            "What is the sum of {a} and {b}?", "Can you add {a} and {b}?"),
    "sub": ("What is {a} - {b}?", "What is {a} minus {b}?", "What's {a} - {b}?",
            "Subtract {b} from {a}.", "Compute {a} - {b}.", "{a} - {b} = ?",
            "What is {a} take away {b}?"),
    "diff": ("What is the difference between {a} and {b}?",
             "How far apart are {a} and {b}?"),
    "mul": ("What is {a} * {b}?", "What is {a} times {b}?", "What's {a} x {b}?",
            "Multiply {a} by {b}.", "What is the product of {a} and {b}?", "{a} * {b} = ?"),
    "capital": ("What is the capital of {x}?", "What's the capital of {x}?",
                "Which city is the capital of {x}?", "Name the capital of {x}.",
                "Tell me the capital of {x}."),
    "colour": ("What colour is {x}?", "What color is {x}?", "Which colour is {x}?",
               "What is the colour of {x}?", "Tell me the color of {x}."),
    "sound": ("What sound does {x} make?", "What does {x} say?", "What noise does {x} make?",
              "Which sound does {x} make?", "How does {x} sound?"),
    "spell": ("How do you spell {w}?", "Spell {w}.", "Spell the word {w}.",
              "Can you spell {w}?", "How is {w} spelled?"),
    "count": ("How many letters are in {w}?", "How many letters are in the word {w}?",
              "How many letters does {w} have?", "Count the letters in {w}."),
    "count_letter": ("How many times does the letter {c} appear in {w}?",
                     "How many times does {c} appear in the word {w}?",
                     "Count the letter {c} in {w}."),
    "describe": ("Describe {x}.", "Tell me about {x}.", "What do you know about {x}?",
                 "Give me a short description of {x}."),
    "greet": ("Hello!", "Hi!", "Hi there.", "Hey!", "Good morning!", "Good evening!",
              "Hello, how are you?"),
    "thanks": ("Thanks!", "Thank you.", "Thanks a lot!", "Great, thank you!"),
    "identity": ("Who are you?", "What can you do?", "What is your name?"),
}  # fmt: skip

# Follow-up phrasings: they continue the previous question, whose task decides their meaning.
FOLLOWUPS: dict[str, tuple[str, ...]] = {
    "add": ("And plus {n}?", "Now add {n}.", "Add {n} more.", "And if you add {n}?"),
    "sub": ("And minus {n}?", "Now subtract {n}.", "Take away {n}.", "And if you subtract {n}?"),
    "mul": ("And times {n}?", "Now multiply that by {n}.", "Multiply the result by {n}."),
    "double": ("Now double it.", "And double that?", "Double it."),
    "entity": ("And {x}?", "What about {x}?", "And what about {x}?", "How about {x}?"),
    "word": ("And {w}?", "What about {w}?", "And the word {w}?"),
}  # fmt: skip

POLITE_OPENINGS = ("Sure! ", "Of course! ", "Happy to help! ", "Certainly! ")
POLITE_CLOSINGS = ("", " I hope that helps!", " Let me know if you need anything else.")

# Reply bodies per form and style; polite, unless given, = an opening + a plain body (+ a
# closing).
REPLIES: dict[str, dict[str, tuple[str, ...]]] = {
    "add": {
        "brief": ("{v}",),
        "plain": ("{a} + {b} = {work}{v}.",),
        "verbose": ("To add {a} and {b}, start at {a} and count up by {b}. The result is {v}.",
                    "Adding {b} to {a} gives a total of {v}. So {a} + {b} = {v}."),
    },
    "sub": {
        "brief": ("{v}",),
        "plain": ("{a} - {b} = {work}{v}.",),
        "verbose": ("To subtract {b} from {a}, start at {a} and count down by {b}. "
                    "The result is {v}.",
                    "Taking {b} away from {a} leaves {v}. So {a} - {b} = {v}."),
    },
    "diff": {
        "brief": ("{v}",),
        "plain": ("{hi} - {lo} = {work}{v}.",),
        "verbose": ("The difference is the larger number minus the smaller one, "
                    "so the difference between {a} and {b} is {v}.",),
    },
    "mul": {
        "brief": ("{v}",),
        "plain": ("{a} * {b} = {work}{v}.",),
        "verbose": ("Multiplying {a} by {b} means adding {a} to itself {b} times. "
                    "The result is {v}.",
                    "{a} groups of {b} make {v} in total. So {a} * {b} = {v}."),
    },
    "capital": {
        "brief": ("{v}.", "{v}"),
        "plain": ("The capital of {x} is {v}.", "{v} is the capital of {x}."),
        "verbose": ("The capital of {x} is {v}. It is the city where the country's "
                    "government sits.", "{v} is the capital city of {x}, and one of its "
                    "best-known places."),
    },
    "colour": {
        "brief": ("{V}.", "{v}"),
        "plain": ("{X} is {v}.", "The colour of {x} is {v}."),
        "verbose": ("{X} is {v}. That is the colour most people picture when they think "
                    "of {x}.", "Usually {x} is {v}, which is its most common colour."),
    },
    "sound": {
        "brief": ("{V}!", "{v}"),
        "plain": ("{X} says {v}.", "{X} goes {v}."),
        "verbose": ("{X} makes a sound like {v}. You can often hear it on a farm or "
                    "in the wild.", "The sound {x} makes is usually written as {v}."),
    },
    "spell": {
        "brief": ("{s}",),
        "plain": ("{w} is spelled {s}.", "It is spelled {s}."),
        "verbose": ("The word {w} is spelled {s}, one letter at a time.",
                    "Letter by letter, {w} is spelled {s}."),
    },
    "count": {
        "brief": ("{v}",),
        "plain": ("{w} has {v} letters.", "There are {v} letters in {w}."),
        "verbose": ("The word {w} is spelled {s}, so it has {v} letters.",
                    "Counting the letters of {w} one by one gives {v} letters."),
    },
    "count_letter": {
        "brief": ("{v}",),
        "plain": ("The letter {c} appears {v} {times} in {w}.", "{c} appears {v} {times}."),
        "verbose": ("The word {w} is spelled {s}, and the letter {c} appears {v} {times}.",),
    },
    "describe": {
        "brief": ("{short}",),
        "plain": ("{short}",),
        "verbose": ("{short} {more}",),
    },
    "greet": {
        "brief": ("Hi!", "Hello!"),
        "polite": ("Hello! I'm glad you're here. How can I help you today?",
                   "Hi there, thank you for stopping by! What can I do for you?"),
        "plain": ("Hello! How can I help?", "Hi! What would you like to know?"),
        "verbose": ("Hello! I can do sums, answer questions about capitals, colours and "
                    "animals, and spell or count words. What would you like to know?",),
    },
    "thanks": {
        "brief": ("You're welcome.",),
        "polite": ("You're very welcome! I'm glad I could help.",),
        "plain": ("You're welcome!", "You're welcome, glad it helped."),
        "verbose": ("You're welcome! Ask me anything else about numbers, words or facts "
                    "whenever you like.",),
    },
    "identity": {
        "brief": ("I am loopchat.",),
        "polite": ("I am loopchat, a small assistant, and I'm happy to help with sums and "
                   "simple questions!",),
        "plain": ("I am loopchat, a small assistant.",
                  "I am loopchat. I can do sums and answer simple questions."),
        "verbose": ("I am loopchat, a small assistant that learns from its users' rankings. "
                    "I can do sums, answer questions about capitals, colours and animals, "
                    "and spell or count words.",),
    },
}  # fmt: skip

GREETING_WORDS = ("hello", "hi", "hey", "good morning", "good evening")
POLITE_MARKERS = ("sure", "of course", "happy to", "certainly", "please", "thank", "hope",
                  "glad", "let me know", "welcome", "feel free")  # fmt: skip


# --- questions and their answers ------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One user turn understood: its task (the benchmark category), the reply form, the right
    answer, the slot values replies are written with, and the key that decides its split."""

    task: str
    form: str
    gold: str
    fields: dict[str, str] = field(hash=False)
    key: tuple | None = None  # None: in both splits (small talk has nothing to hold out)


def split_of(key: tuple) -> str:
    """``train`` or ``heldout``, stable across runs and machines (not Python's salted hash)."""
    digest = hashlib.md5(repr(key).encode()).digest()
    return "heldout" if digest[0] * 100 // 256 < HELDOUT_PERCENT else "train"


def spelled(word: str) -> str:
    return "-".join(word.lower())


def worked(form: str, a: int, b: int) -> str:
    """The intermediate step a plain answer shows before the result ("" when there is none).

    One step splits a two-digit problem into one-digit ones: 47 + 38 = 70 + 15 = 85,
    83 - 47 = 43 - 7 = 36, 37 * 3 = 90 + 21 = 111. Written out, each token the model must
    produce needs one small operation, which a ~1M-parameter model learns in minutes where
    answering 85 at once (carries and all) it mostly did not: the way chat models show work.
    """
    if form == "add" and a >= 10 and b >= 10:
        return f"{a - a % 10 + b - b % 10} + {a % 10 + b % 10} = "
    if form in ("sub", "diff"):
        hi, lo = max(a, b), min(a, b)
        if lo >= 10 and lo % 10:
            return f"{hi - (lo - lo % 10)} - {lo % 10} = "
    if form == "mul" and a > 12 and b < 10:
        return f"{(a - a % 10) * b} + {a % 10 * b} = "
    return ""


def _arith(form: str, a: int, b: int, task: str, phrasing: int | None = None) -> Question:
    """A sum, difference or product. A sum's or difference's key is the operation and operands,
    whether asked fresh or as a follow-up, so a held-out sum never appears in training in any
    form. A fresh product is from the 0-12 times table, which is recalled, not worked out: like
    a fact it is held out by phrasing and operands (``phrasing`` given)."""
    value = {"add": a + b, "sub": a - b, "diff": abs(a - b), "mul": a * b}[form]
    key: tuple = ("sub" if form == "diff" else form, a, b)
    if form == "mul" and phrasing is not None:
        key = ("mul", phrasing, a, b)
    fields = {"a": str(a), "b": str(b), "v": str(value), "hi": str(max(a, b)),
              "lo": str(min(a, b)), "work": worked(form, a, b)}  # fmt: skip
    return Question(task, form, str(value), fields, key)


def _fact(form: str, entity: str, task: str, key: tuple) -> Question:
    table = FACT_TABLES[form]
    name = next(e for e in table if e.lower() == entity.lower())
    value = table[name]
    fields = {"x": name, "X": name[0].upper() + name[1:], "v": value, "V": value.capitalize()}
    return Question(task, form, value, fields, key)


def _word(form: str, word: str, task: str, letter: str = "") -> Question:
    word = word.lower()
    fields = {"w": word, "s": spelled(word), "c": letter.lower()}
    if form == "spell":
        gold = fields["s"]
    elif form == "count":
        gold = str(len(word))
    else:
        gold = str(word.count(letter.lower()))
        fields["times"] = "time" if gold == "1" else "times"
    fields["v"] = gold
    return Question(task, form, gold, fields, ("word", word))


FACT_TABLES = {"capital": CAPITALS, "colour": COLOURS, "sound": SOUNDS}
ARITH_FORMS = ("add", "sub", "diff", "mul")
WORD_FORMS = ("spell", "count", "count_letter")


def _fresh(form: str, slots: dict[str, str], phrasing: int) -> Question:
    """The question a fresh (non follow-up) user turn asks."""
    if form in ARITH_FORMS:
        task = "sub" if form == "diff" else form
        return _arith(form, int(slots["a"]), int(slots["b"]), task, phrasing)
    if form in FACT_TABLES:
        return _fact(form, slots["x"], "fact", (form, phrasing, slots["x"].lower()))
    if form in WORD_FORMS:
        task = "spell" if form == "spell" else "count"
        return _word(form, slots["w"], task, slots["c"] if form == "count_letter" else "")
    if form == "describe":
        name = next(e for e in DESCRIPTIONS if e.lower() == slots["x"].lower())
        short, more, keyword = DESCRIPTIONS[name]
        fields = {"x": name, "short": short, "more": more}
        return Question("describe", form, keyword, fields, ("describe", phrasing, name))
    return Question("chat", form, form, {}, None)


def _follow(kind: str, slots: dict[str, str], prev: Question) -> Question | None:
    """The question a follow-up asks, given the previous question; None if it does not fit."""
    if kind in ("add", "sub", "mul", "double"):
        if prev.form not in ARITH_FORMS:
            return None
        form = "mul" if kind == "double" else kind
        n = 2 if kind == "double" else int(slots["n"])
        return _arith(form, int(prev.gold), n, "followup_math")
    if kind == "entity" and prev.form in FACT_TABLES:
        if slots["x"].lower() not in {e.lower() for e in FACT_TABLES[prev.form]}:
            return None
        key = (prev.form, "follow", slots["x"].lower())
        return _fact(prev.form, slots["x"], "followup_fact", key)
    if kind == "word" and prev.form in WORD_FORMS:
        return _word(prev.form, slots["w"], "followup_word", prev.fields["c"])
    return None


# --- parsing user turns ---------------------------------------------------------------------

_SLOT_PATTERNS = {"a": r"\d+", "b": r"\d+", "n": r"\d+", "w": r"[A-Za-z]+", "c": r"[A-Za-z]"}


def _entity_pattern(names: Iterator[str]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


def _slot_pattern(form: str, slot: str) -> str:
    if slot != "x":
        return _SLOT_PATTERNS[slot]
    if form == "describe":
        return _entity_pattern(iter(DESCRIPTIONS))
    if form in FACT_TABLES:
        return _entity_pattern(iter(FACT_TABLES[form]))
    return _entity_pattern(e for table in FACT_TABLES.values() for e in table)


def _compile(phrasing: str, form: str) -> re.Pattern[str]:
    """A phrasing as a tolerant pattern: any case, flexible spaces, any final punctuation."""
    body = phrasing.rstrip("?.!")
    out = []
    for i, part in enumerate(re.split(r"\{(\w)\}", body)):
        if i % 2:
            out.append(f"(?P<{part}>{_slot_pattern(form, part)})")
            continue
        literal = re.escape(part)
        # a space between two words must stay a space; around symbols it is optional
        literal = re.sub(r"(?<=\w)(\\ )+(?=\w)", r"\\s+", literal)
        literal = re.sub(r"(\\ )+", r"\\s*", literal)
        if i > 0 and part[:1].isalnum():
            literal = r"\s*" + literal
        out.append(literal)
    return re.compile(r"^\s*" + "".join(out) + r"\s*[?.!]*\s*$", re.IGNORECASE)


_QUESTION_PATTERNS = [
    (form, i, _compile(p, form)) for form, ps in QUESTIONS.items() for i, p in enumerate(ps)
]
_FOLLOWUP_PATTERNS = [(kind, _compile(p, "followup")) for kind, ps in FOLLOWUPS.items() for p in ps]


def parse_turn(text: str, prev: Question | None) -> Question | None:
    """Understand one user turn (a follow-up needs the previous question)."""
    for form, phrasing, pattern in _QUESTION_PATTERNS:
        if m := pattern.match(text):
            return _fresh(form, m.groupdict(), phrasing)
    if prev is not None:
        for kind, pattern in _FOLLOWUP_PATTERNS:
            if (m := pattern.match(text)) and (q := _follow(kind, m.groupdict(), prev)):
                return q
    return None


def solve(messages: list[dict]) -> Question | None:
    """The question the last user turn asks, reading earlier user turns for follow-ups.

    Follow-ups chain on the right answers of earlier turns, not on what the assistant said:
    after "What is 2 + 3?" / "6" / "And plus 1?" the right answer is 6.
    """
    prev: Question | None = None
    question: Question | None = None
    for message in messages:
        if message.get("role") != "user":
            continue
        question = parse_turn(str(message.get("content", "")), prev)
        prev = question or prev
    if not messages or messages[-1].get("role") != "user":
        return None
    return question


# --- checking answers -------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<!\w)-?\d+")
_SPELLING = re.compile(r"(?<![\w-])[a-z](?:-[a-z])+(?![\w-])", re.IGNORECASE)


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text, re.IGNORECASE) is not None


def check_answer(messages: list[dict], answer: str) -> bool:
    """Is ``answer`` right for the last user turn of ``messages``?

    Numbers: the last number in the answer is the right one. Facts: the right value is named
    and no other value of the same table is. Spelling: every hyphenated spelling is the
    right one. Descriptions and small talk: the answer contains what such a reply must.
    Unknown questions are never right (there is nothing to check against).
    """
    q = solve(messages)
    if q is None:
        return False
    if q.form in ARITH_FORMS or q.form in ("count", "count_letter"):
        numbers = _NUMBER.findall(answer)
        return bool(numbers) and int(numbers[-1]) == int(q.gold)
    if q.form in FACT_TABLES:
        others = set(FACT_TABLES[q.form].values()) - {q.gold}
        return _mentions(answer, q.gold) and not any(_mentions(answer, o) for o in others)
    if q.form == "spell":
        found = [s.lower() for s in _SPELLING.findall(answer)]
        return bool(found) and all(s == q.gold for s in found)
    if q.form == "greet":
        return any(_mentions(answer, w) for w in GREETING_WORDS)
    if q.form == "thanks":
        return _mentions(answer, "welcome")
    if q.form == "identity":
        return _mentions(answer, "loopchat")
    return _mentions(answer, q.gold)  # describe: its keyword


# --- preferences the simulated users rank by ------------------------------------------------


def correctness(messages: list[dict], answer: str) -> float:
    """1.0 for a right answer, else 0.0."""
    return float(check_answer(messages, answer))


def brevity(answer: str) -> float:
    """In (0, 1]: 1 for an empty answer, ~0.37 at 10 words, falling with length."""
    return math.exp(-len(answer.split()) / 10)


def politeness(answer: str) -> float:
    """In [0, 1]: polite phrases found ("Sure!", "I hope that helps", ...), two or more = 1."""
    text = answer.lower()
    return min(1.0, sum(marker in text for marker in POLITE_MARKERS) / 2)


PREFERENCES: dict[str, Callable[[list[dict], str], float]] = {
    "correct": correctness,
    "brief": lambda messages, answer: brevity(answer),
    "polite": lambda messages, answer: politeness(answer),
}


# --- generating conversations ---------------------------------------------------------------

# How often each fresh task starts an exchange: arithmetic-heavy, since it is what the small
# model finds hardest and what the follow-ups build on.
FORM_WEIGHTS = {
    "add": 36, "sub": 16, "diff": 7, "mul": 10, "capital": 5, "colour": 3, "sound": 3,
    "spell": 2, "count": 3, "count_letter": 1, "describe": 2, "identity": 1,
}  # fmt: skip
FOLLOWUP_PROBABILITY = {"arith": 0.5, "fact": 0.3, "word": 0.25}
STYLE_WEIGHTS = (0.3, 0.35, 0.25, 0.1)


def reply(q: Question, style: str, rng: random.Random) -> str:
    """The assistant's answer to ``q`` in ``style``."""
    bodies = REPLIES[q.form]
    if style == "polite" and "polite" not in bodies:
        body = rng.choice(bodies["plain"]).format(**q.fields)
        return rng.choice(POLITE_OPENINGS) + body + rng.choice(POLITE_CLOSINGS)
    return rng.choice(bodies[style]).format(**q.fields)


def _sample_fresh(form: str, rng: random.Random) -> tuple[str, Question]:
    i = rng.randrange(len(QUESTIONS[form]))
    slots: dict[str, str] = {}
    if form in ("add", "sub", "diff"):
        a = rng.randrange(100)
        b = rng.randrange(100) if form == "add" else rng.randrange(a + 1)
        slots = {"a": str(a), "b": str(b)}
    elif form == "mul":
        slots = {"a": str(rng.randrange(13)), "b": str(rng.randrange(13))}
    elif form in FACT_TABLES or form == "describe":
        table = FACT_TABLES.get(form, DESCRIPTIONS)
        slots = {"x": rng.choice(list(table))}
    elif form in WORD_FORMS:
        word = rng.choice(WORDS)
        slots = {"w": word, "c": rng.choice(word)}
    text = QUESTIONS[form][i].format(**slots)
    return text, _fresh(form, slots, i)


def _sample_followup(prev: Question, rng: random.Random) -> tuple[str, Question] | None:
    if prev.form in ARITH_FORMS:
        value = int(prev.gold)
        kinds = ["add", "add", "sub"] + (["double", "mul"] if value <= 50 else [])
        kind = rng.choice(kinds) if value > 0 else "add"
        n = {"add": rng.randint(1, 20), "sub": rng.randint(1, max(1, min(value, 20))),
             "mul": rng.randint(2, 3), "double": 2}[kind]  # fmt: skip
        slots = {"n": str(n)}
    elif prev.form in FACT_TABLES:
        kind = "entity"
        others = [e for e in FACT_TABLES[prev.form] if e != prev.fields["x"]]
        slots = {"x": rng.choice(others)}
    elif prev.form in WORD_FORMS:
        kind = "word"
        candidates = [w for w in WORDS if not prev.fields["c"] or prev.fields["c"] in w]
        slots = {"w": rng.choice(candidates)}
    else:
        return None
    text = rng.choice(FOLLOWUPS[kind]).format(**slots)
    q = _follow(kind, slots, prev)
    return (text, q) if q is not None else None


def _followup_chance(q: Question) -> float:
    if q.form in ARITH_FORMS:
        return FOLLOWUP_PROBABILITY["arith"]
    if q.form in FACT_TABLES:
        return FOLLOWUP_PROBABILITY["fact"]
    return FOLLOWUP_PROBABILITY["word"] if q.form in WORD_FORMS else 0.0


def _in_split(sample: Callable[[], tuple[str, Question] | None], split: str, tries: int = 500):
    """Draw from ``sample`` until the question falls in ``split`` (None if it never does);
    small talk (no key) belongs to both splits."""
    for _ in range(tries):
        drawn = sample()
        if drawn is not None and (drawn[1].key is None or split_of(drawn[1].key) == split):
            return drawn
    return None


def conversation(rng: random.Random, split: str = "train") -> list[dict]:
    """One demonstration: optional system prompt and greeting, one or two tasks, each maybe
    followed by follow-ups, maybe a thank-you; written in one style throughout."""
    style = rng.choices(STYLES, weights=STYLE_WEIGHTS)[0]
    messages: list[dict] = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})

    def exchange(text: str, q: Question) -> None:
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": reply(q, style, rng)})

    if rng.random() < 0.12:
        exchange(*_sample_fresh("greet", rng))
    for _ in range(rng.choice((1, 1, 2))):
        form = rng.choices(list(FORM_WEIGHTS), weights=list(FORM_WEIGHTS.values()))[0]
        drawn = _in_split(lambda f=form: _sample_fresh(f, rng), split)
        while drawn is not None:
            exchange(*drawn)
            prev = drawn[1]
            if rng.random() >= _followup_chance(prev):
                break
            drawn = _in_split(lambda p=prev: _sample_followup(p, rng), split)
    if rng.random() < 0.08:
        exchange(*_sample_fresh("thanks", rng))
    return messages


def demonstrations(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` conversations in the OpenAI fine-tuning format ``{"messages": [...]}``."""
    rng = random.Random(seed)
    return [{"messages": conversation(rng, split)} for _ in range(n)]


def pretrain_texts(n: int, seed: int = 0) -> list[str]:
    """Plain text for pre-training: documents of questions each followed by an answer, all
    from the training split (no chat template, no roles)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for message in conversation(rng, "train"):
            if message["role"] != "system":
                lines.append(message["content"])
        docs.append("\n".join(lines))
    return docs


BENCH_TASKS = ("add", "sub", "mul", "fact", "followup_math", "followup_fact", "spell",
               "count", "followup_word", "describe", "chat")  # fmt: skip
_TASK_FORMS = {
    "add": ("add",), "sub": ("sub", "diff"), "mul": ("mul",),
    "fact": ("capital", "colour", "sound"), "spell": ("spell",),
    "count": ("count", "count_letter"), "describe": ("describe",),
    "chat": ("greet", "thanks", "identity"),
    "followup_math": ("add", "sub", "mul"), "followup_fact": ("capital", "colour", "sound"),
    "followup_word": ("spell", "count"),
}  # fmt: skip


def prompts(
    n_per_task: int, seed: int = 0, split: str = "heldout", tasks: tuple[str, ...] = BENCH_TASKS
) -> list[tuple[str, list[dict]]]:
    """Prompts ending in a user turn whose question is in ``split``, about ``n_per_task`` per
    task, as ``(task, messages)``.

    A follow-up prompt carries its earlier exchange (a training question) with a right (plain)
    answer in context, so it measures using the earlier turns on a held-out question.
    """
    rng = random.Random(seed)
    out = []
    for task in tasks:
        for _ in range(n_per_task):
            form = rng.choice(_TASK_FORMS[task])
            context: list[dict] = []
            if task.startswith("followup"):
                base = _in_split(lambda f=form: _sample_fresh(f, rng), "train")
                drawn = base and _in_split(lambda b=base[1]: _sample_followup(b, rng), split)
                if base:
                    context = [
                        {"role": "user", "content": base[0]},
                        {"role": "assistant", "content": reply(base[1], "plain", rng)},
                    ]
            else:
                drawn = _in_split(lambda f=form: _sample_fresh(f, rng), split)
            if drawn:
                out.append((task, [*context, {"role": "user", "content": drawn[0]}]))
    return out


def tokenizer_texts(n: int = 4000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: demonstrations and small talk, every phrasing."""
    texts = [m["content"] for d in demonstrations(n, seed) for m in d["messages"]]
    texts += [p for ps in QUESTIONS.values() for p in ps]
    return texts

"""The built-in tasks: the tables, phrasings and answer templates, and the question model.

Small conversational tasks (greetings, sums, differences, products, facts from a built-in table,
spelling, letter counting, short descriptions, and follow-ups such as "And plus 5?" that only
make sense with the earlier turns), each answerable in several styles (brief, plain, polite,
verbose), so sampled answers differ in correctness, length and politeness.

Held-out split: every question has a key (the operand pair of a sum, the phrasing and entity of
a fact, the word of a spelling); a stable hash of it puts ~10% of keys in ``heldout``
(:func:`split_of`). Training text and demonstrations use only ``train`` keys, so benchmarks
measure answers the model never saw.
"""

from __future__ import annotations

import hashlib
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


def fresh_question(form: str, slots: dict[str, str], phrasing: int) -> Question:
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


def followup_question(kind: str, slots: dict[str, str], prev: Question) -> Question | None:
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

"""The demo world: fictional people, their bios, questions with sentence answers, and a word-level tokenizer.

A world is a few populations of fictional people (DESIGN.md, "The demo world"):

    A  read by the pretrained model (its bios); the instruct model is tuned on QA about half of A
       ("A_train") and tested on the other half ("A_test": out-of-domain knowledge the model already has)
    B  the new population: unlabeled bios for knowledge adapters, QA in-domain, passages for RAG
    C  more text that only the "version 2" pretrained model reads (PortLLM)
and, for reading practice (QA with the bio in the prompt, so that the instruct model learns to read a
context as RAG needs), `stranger(rng)`: a new person drawn for every example from the names no population
uses, with random attributes, so that no model can memorise them (a fixed reading population was
memorised instead of read: 89-96% with its gold bio, 5% with B's). How the instruct model is taught to
read, and what learning closed-book answers does to its reading, is in models.train_world_model.

Each person has a first and a last name token and 4 attributes. Each attribute is written in 3
paraphrased templates that repeat the full name; a bio is the 4 sentences, templates and order drawn at
random (so every call gives a new paraphrase). Questions are paraphrased too; the expected answer is a
full sentence ("Q: Where was F L born ? A: F L was born in Varo ."): a prototype found that bare-value
answers make the instruct model memorise the tuned people instead of learning to recall. Everything is a
pure function of the seed; full names are unique across all populations.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

ATTRIBUTES = ("city", "year", "university", "employer")

# Sentences of a bio, 3 paraphrases per attribute; {n} is the full name, {v} the value.
BIO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": ("{n} was born in {v} .", "The birth city of {n} is {v} .", "{n} came into the world in {v} ."),
    "year": ("{n} was born in the year {v} .", "The birth year of {n} is {v} .", "{n} arrived in {v} ."),
    "university": ("{n} studied at {v} .", "{n} graduated from {v} .", "{n} is an alumnus of {v} ."),
    "employer": ("{n} works for {v} .", "{n} is employed by {v} .", "{n} has a job at {v} ."),
}
# Questions (3 paraphrases per attribute) and the one sentence an answer should be.
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": ("What is the birth city of {n} ?", "Where was {n} born ?", "In which city was {n} born ?"),
    "year": ("What is the birth year of {n} ?", "When was {n} born ?", "In which year was {n} born ?"),
    "university": ("Which university did {n} attend ?", "Where did {n} study ?", "What is the university of {n} ?"),
    "employer": ("Who employs {n} ?", "Where does {n} work ?", "What is the employer of {n} ?"),
}
ANSWER_TEMPLATES: dict[str, str] = {
    "city": "{n} was born in {v} .",
    "year": "{n} was born in the year {v} .",
    "university": "{n} studied at {v} .",
    "employer": "{n} works for {v} .",
}
# The evaluation protocol's prompts (DESIGN.md, "Evaluation protocol"), the words the tokenizer must know.
SYSTEM_PROMPT = "Answer the following question."
RAG_PROMPT = "Answer the following question given this context: {context}"  # bios end with "."
ROLES = ("system", "user", "assistant")
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<s> ' + m['role'] + ' : ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s> assistant :' }}{% endif %}"
)

# Sizes of the value sets (chance of guessing one attribute: 1/20, 1/40, 1/12, 1/16).
N_FIRST, N_LAST, N_CITY, N_UNI, N_EMPLOYER = 48, 48, 20, 12, 16
YEARS = tuple(str(y) for y in range(1950, 1990))


def _coined_words(n: int, rng: random.Random, taken: set[str], syllables: tuple[int, int]) -> list[str]:
    """`n` new capitalised pronounceable words (consonant-vowel syllables) not in `taken`."""
    cons, vows = "bdfgklmnprstvz", "aeiou"
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(*syllables)
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(k)).capitalize()
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _lexicon() -> dict[str, list[str]]:
    """The fixed value vocabulary (independent of the world seed, so one tokenizer serves every world)."""
    rng, taken = random.Random(20240607), set()
    return {
        "first": _coined_words(N_FIRST, rng, taken, (2, 2)),
        "last": _coined_words(N_LAST, rng, taken, (3, 3)),
        "city": _coined_words(N_CITY, rng, taken, (2, 3)),
        "university": [w + " University" for w in _coined_words(N_UNI, rng, taken, (2, 3))],
        "employer": _coined_words(N_EMPLOYER, rng, taken, (2, 3)),
        "year": list(YEARS),
    }


LEXICON = _lexicon()


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    city: str
    year: str
    university: str
    employer: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def id(self) -> str:
        return f"{self.first}_{self.last}"

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass
class World:
    """Populations of people drawn from one seed; every text-producing method takes its own rng."""

    seed: int
    populations: dict[str, list[Person]] = field(default_factory=dict)
    spare_names: list[tuple[str, str]] = field(default_factory=list)  # names no population uses

    def __getitem__(self, population: str) -> list[Person]:
        return self.populations[population]

    def stranger(self, rng: random.Random) -> Person:
        """A person no population holds, with random attributes: new at every call (reading practice)."""
        first, last = rng.choice(self.spare_names)
        return Person(first, last, *(rng.choice(LEXICON[a]) for a in ATTRIBUTES))

    # --- text ------------------------------------------------------------------------------------------

    @staticmethod
    def sentence(p: Person, attribute: str, rng: random.Random) -> str:
        return rng.choice(BIO_TEMPLATES[attribute]).format(n=p.name, v=p.value(attribute))

    @classmethod
    def bio(cls, p: Person, rng: random.Random) -> str:
        """The 4 facts of `p`, one random paraphrase each, in random order."""
        attrs = list(ATTRIBUTES)
        rng.shuffle(attrs)
        return " ".join(cls.sentence(p, a, rng) for a in attrs)

    def corpus(self, population: str, copies: int, seed: int) -> list[str]:
        """`copies` independently paraphrased bios of every person of `population` (unlabeled text)."""
        rng = random.Random(f"{self.seed}/{population}/corpus/{seed}")
        docs = [self.bio(p, rng) for _ in range(copies) for p in self[population]]
        rng.shuffle(docs)
        return docs

    def passages(self, population: str) -> list[dict]:
        """One bio per person as a retrieval passage: {"id", "text"}."""
        rng = random.Random(f"{self.seed}/{population}/passages")
        return [{"id": p.id, "text": self.bio(p, rng)} for p in self[population]]

    @staticmethod
    def answer(p: Person, attribute: str) -> str:
        return ANSWER_TEMPLATES[attribute].format(n=p.name, v=p.value(attribute))

    def questions(self, population: str, people: list[Person] | None = None) -> list[dict]:
        """One question per (person, attribute), paraphrase drawn by seed, in DESIGN.md's JSONL shape:
        {"id", "question", "answers": [value], "passage_id", "attribute", "answer_sentence"}."""
        rng = random.Random(f"{self.seed}/{population}/questions")
        out = []
        for p in self[population] if people is None else people:
            for a in ATTRIBUTES:
                out.append({
                    "id": f"{p.id}/{a}", "question": rng.choice(QUESTION_TEMPLATES[a]).format(n=p.name),
                    "answers": [p.value(a)], "passage_id": p.id, "attribute": a,
                    "answer_sentence": self.answer(p, a),
                })
        return out

    @staticmethod
    def chat(p: Person, attribute: str, rng: random.Random, context: str | None = None) -> list[dict]:
        """A chat-format QA example: system prompt (with the bio as context for reading practice),
        a paraphrased question, and the sentence answer."""
        system = SYSTEM_PROMPT if context is None else RAG_PROMPT.format(context=context)
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": rng.choice(QUESTION_TEMPLATES[attribute]).format(n=p.name)},
            {"role": "assistant", "content": World.answer(p, attribute)},
        ]


def make_world(seed: int = 0, sizes: dict[str, int] | None = None) -> World:
    """Draw the populations (default A=200, B=100, C=100 people) from `seed`.

    Full names (first, last) are drawn without replacement from all 48x48 combinations, so no two
    people of the whole world share a name; attribute values are drawn uniformly and independently.
    """
    sizes = dict(sizes or {"A": 200, "B": 100, "C": 100})
    total = sum(sizes.values())
    if total >= N_FIRST * N_LAST:
        raise ValueError(f"a world holds at most {N_FIRST * N_LAST} people, asked for {total}")
    rng = random.Random(f"readapt-world/{seed}")
    names = rng.sample([(f, l) for f in LEXICON["first"] for l in LEXICON["last"]], N_FIRST * N_LAST)
    world, i = World(seed=seed, spare_names=names[total:]), 0
    for pop, n in sizes.items():
        world.populations[pop] = [
            Person(f, l, *(rng.choice(LEXICON[a]) for a in ATTRIBUTES)) for f, l in names[i : i + n]
        ]
        i += n
    return world


# --- tokenizer ------------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """Every token a world can produce: specials, roles, template and prompt words, values."""
    words: list[str] = list(SPECIALS) + list(ROLES) + [":", "?", "."]
    texts = [t for ts in (*BIO_TEMPLATES.values(), *QUESTION_TEMPLATES.values()) for t in ts]
    texts += [*ANSWER_TEMPLATES.values(), SYSTEM_PROMPT, RAG_PROMPT]
    for t in texts:
        for w in _pretokenize(t.replace("{n}", " ").replace("{v}", " ").replace("{context}", " ")):
            words.append(w)
    for key in ("first", "last", "city", "employer", "year"):
        words += LEXICON[key]
    words += [w for u in LEXICON["university"] for w in u.split()]
    return list(dict.fromkeys(words))  # de-duplicated, order kept


def _pretokenize(text: str) -> list[str]:
    return [w for w, _ in _pre_tokenizer().pre_tokenize_str(text)]


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    # split on whitespace, then isolate each punctuation mark ("question." -> "question", ".")
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def build_tokenizer():
    """A word-level Hugging Face fast tokenizer over `vocabulary()` with the world's chat template.

    Saved with `save_pretrained`, it loads with `AutoTokenizer.from_pretrained` and no readapt import.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_jsonl(path: Path | str, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path

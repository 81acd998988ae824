"""The embedded default world: a small, seeded, synthetic world of text.

The workbench uses it to train and evaluate language models offline. A world has
a general corpus (everyday facts about invented countries, animals and people),
a domain corpus (the mineralogy of the invented planet Quorrax, with its own
vocabulary), chat-format instruction data over the general facts, and held-out
evaluation sets: documents plus exact-match question and cloze sets.

Everything is drawn from ``random.Random`` instances seeded from the world seed,
so the same seed always gives byte-identical output.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .io import write_atomic
from .io import read_jsonl

USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"
EOS_TOKEN = "<|endoftext|>"


def chat_prompt(question: str) -> str:
    """Return the chat-format prompt for one user question, ending where the answer starts."""
    return f"{USER_TOKEN}\n{question}\n{ASSISTANT_TOKEN}\n"


@dataclass(frozen=True)
class QA:
    """One exact-match item: a prompt and the short answer expected after it."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Fact:
    """One fact of a fact base: ``relation`` of ``subject`` is ``answer``."""

    subject: str
    relation: str
    answer: str


DOC_SPLITS = ("general_train", "general_eval", "domain_train", "domain_eval")
QA_SPLITS = ("instruct_train", "general_qa_eval", "general_cloze_eval", "domain_cloze_eval")
SPLITS = DOC_SPLITS + QA_SPLITS
# labelled splits for sequence classification (`workbench.data.read_labelled`): sentences of the
# documents of the first split (label 0, general) and of the second (label 1, domain)
TOPIC_SPLITS = {"topic_train": ("general_train", "domain_train"),
                "topic_eval": ("general_eval", "domain_eval")}


def qa_text(qa: QA) -> str:
    """Render a QA item as one training text: chat items get END_TOKEN, cloze items a space."""
    if qa.prompt.startswith(USER_TOKEN):
        return qa.prompt + qa.answer + END_TOKEN
    return f"{qa.prompt} {qa.answer}"


@dataclass(frozen=True)
class World:
    """All splits of one generated world."""

    seed: int
    general_train: list[str]
    general_eval: list[str]
    domain_train: list[str]
    domain_eval: list[str]
    instruct_train: list[QA]
    general_qa_eval: list[QA]
    general_cloze_eval: list[QA]
    domain_cloze_eval: list[QA]

    def split(self, name: str) -> list:
        """Return a split by name (documents or QA items); ValueError for an unknown name."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
        return getattr(self, name)

    def split_text(self, name: str) -> list[str]:
        """Return a split by name as plain texts (QA items rendered with ``qa_text``)."""
        items = self.split(name)
        if name in QA_SPLITS:
            return [qa_text(qa) for qa in items]
        return list(items)


def split_text(world: World, name: str) -> list[str]:
    """Return split ``name`` of ``world`` as plain texts; ValueError for an unknown name."""
    return world.split_text(name)


WORLD_SIZES: dict[str, dict[str, int]] = {
    "tiny": {
        "general_train": 400,
        "general_eval": 60,
        "domain_train": 200,
        "domain_eval": 60,
        "instruct_train": 300,
        "general_qa_eval": 40,
        "general_cloze_eval": 40,
        "domain_cloze_eval": 40,
    },
    "default": {
        "general_train": 4000,
        "general_eval": 300,
        "domain_train": 2000,
        "domain_eval": 300,
        "instruct_train": 3000,
        "general_qa_eval": 200,
        "general_cloze_eval": 200,
        "domain_cloze_eval": 200,
    },
}

# Entity counts of the fact bases (the same for every size).
GENERAL_COUNTS = {"country": 48, "animal": 40, "person": 60}
DOMAIN_COUNTS = {"crystal": 48}
QA_HOLDOUT_FRACTION = 0.25
# How often a fact is stated in its cloze form, so cloze prompts are seen in training.
CLOZE_FORM_WEIGHT = 0.3

# ---------------------------------------------------------------------------
# Relations: a cloze prefix (the first statement template is the cloze prefix
# followed by the answer), more statement templates, and question templates.
# ``{e}`` is the subject, ``{a}`` the answer.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
    """How one relation is stated in text, asked as a cloze, and asked as a question."""

    name: str
    kind: str
    cloze: str
    templates: tuple[str, ...]
    questions: tuple[str, ...] = ()
    tail: str = ""

    def statements(self) -> tuple[str, ...]:
        """All statement templates, the cloze form ("<cloze> <answer><tail>.") first."""
        return (self.cloze + " {a}" + self.tail + ".",) + self.templates


GENERAL_RELATIONS = (
    Relation(
        "capital", "country", "The capital of {e} is",
        (
            "{a} is the capital of {e}.",
            "The capital city of {e} is {a}.",
            "{e} is governed from its capital, {a}.",
            "Most government offices of {e} are in {a}, the capital.",
            "Visitors to {e} usually arrive first in {a}, its capital city.",
            "{a}, the capital of {e}, is its largest city.",
            "In {e}, the capital is {a}.",
            "The seat of government in {e} is the city of {a}.",
        ),
        (
            "What is the capital of {e}?",
            "Which city is the capital of {e}?",
            "Name the capital of {e}.",
            "What city is the seat of government in {e}?",
            "Tell me the capital city of {e}.",
            "In which city is the government of {e}?",
        ),
    ),
    Relation(
        "river", "country", "The main river of {e} is the",
        (
            "The {a} flows through {e}.",
            "The {a} is the longest river in {e}.",
            "{e} is crossed by the {a} river.",
            "Farmers in {e} water their fields from the {a}.",
            "The river {a} runs across {e} to the sea.",
            "In {e}, boats carry goods along the {a}.",
            "Many towns in {e} stand on the banks of the {a}.",
            "The {a} is the main river of {e}.",
        ),
        (
            "What is the main river of {e}?",
            "Which river flows through {e}?",
            "Name the main river of {e}.",
            "What river crosses {e}?",
            "Which river do farmers in {e} use?",
            "Tell me the name of the river in {e}.",
        ),
    ),
    Relation(
        "language", "country", "The language of {e} is",
        (
            "People in {e} speak {a}.",
            "{a} is spoken in {e}.",
            "Most people in {e} speak {a} at home.",
            "The official language of {e} is {a}.",
            "Schools in {e} teach in {a}.",
            "In {e}, newspapers are printed in {a}.",
            "Travellers to {e} should learn a little {a}.",
            "The people of {e} talk to each other in {a}.",
        ),
        (
            "What language is spoken in {e}?",
            "What is the language of {e}?",
            "Which language do people in {e} speak?",
            "Name the official language of {e}.",
            "In what language do schools in {e} teach?",
            "Tell me the language of {e}.",
        ),
    ),
    Relation(
        "currency", "country", "The currency of {e} is the",
        (
            "People in {e} pay with the {a}.",
            "The {a} is the money used in {e}.",
            "In {e}, prices are given in the {a}.",
            "The official currency of {e} is the {a}.",
            "Shops in {e} accept the {a}.",
            "Visitors to {e} change their money into the {a}.",
            "Wages in {e} are paid in the {a}.",
            "The {a} is the currency of {e}.",
        ),
        (
            "What is the currency of {e}?",
            "Which currency is used in {e}?",
            "What money do people in {e} use?",
            "Name the currency of {e}.",
            "What do shops in {e} accept as payment?",
            "Tell me the currency of {e}.",
        ),
    ),
    Relation(
        "colour", "animal", "The colour of the {e} is",
        (
            "The {e} is {a}.",
            "The {e} has a {a} coat.",
            "You can spot a {e} by its {a} colour.",
            "A grown {e} is {a} from head to tail.",
            "Every {e} is {a} in colour.",
            "The {e} is a {a} animal.",
            "Its {a} colour makes the {e} easy to recognise.",
            "The coat of the {e} is {a}.",
        ),
        (
            "What colour is the {e}?",
            "What is the colour of the {e}?",
            "Which colour is the {e}?",
            "Describe the colour of the {e} in one word.",
            "What colour coat does the {e} have?",
            "Tell me the colour of the {e}.",
        ),
    ),
    Relation(
        "diet", "animal", "The {e} eats",
        (
            "The diet of the {e} is mostly {a}.",
            "The {e} feeds on {a}.",
            "A hungry {e} looks for {a}.",
            "The favourite food of the {e} is {a}.",
            "Keepers give the {e} fresh {a} every morning.",
            "The {e} lives on a diet of {a}.",
            "In the wild, the {e} survives by eating {a}.",
            "The {e} spends most of the day searching for {a}.",
        ),
        (
            "What does the {e} eat?",
            "What is the diet of the {e}?",
            "What food does the {e} feed on?",
            "What is the favourite food of the {e}?",
            "Name the food of the {e}.",
            "Tell me what the {e} eats.",
        ),
    ),
    Relation(
        "habitat", "animal", "The {e} lives in the",
        (
            "The natural home of the {e} is the {a}.",
            "You can find the {e} in the {a}.",
            "The {e} makes its home in the {a}.",
            "The {a} is where the {e} lives.",
            "Explorers often see the {e} in the {a}.",
            "The {e} is found mostly in the {a}.",
            "The {e} builds its nest in the {a}.",
            "The habitat of the {e} is the {a}.",
        ),
        (
            "Where does the {e} live?",
            "What is the habitat of the {e}?",
            "Where can you find the {e}?",
            "In what kind of place does the {e} make its home?",
            "Name the home of the {e}.",
            "Tell me where the {e} lives.",
        ),
    ),
    Relation(
        "profession", "person", "{e} works as a",
        (
            "By profession, {e} is a {a}.",
            "{e} earns a living as a {a}.",
            "{e} has worked as a {a} for many years.",
            "Everyone knows {e} as a skilled {a}.",
            "{e} trained for years to become a {a}.",
            "As a {a}, {e} works long hours.",
            "{e} is a {a} by trade.",
            "The profession of {e} is {a}.",
        ),
        (
            "What does {e} do for a living?",
            "What is the profession of {e}?",
            "What job does {e} have?",
            "Name the trade of {e}.",
            "What does {e} work as?",
            "Tell me the job of {e}.",
        ),
    ),
    Relation(
        "home_town", "person", "{e} comes from",
        (
            "{e} was born in {a}.",
            "The home town of {e} is {a}.",
            "{e} grew up in {a}.",
            "{a} is the home town of {e}.",
            "Every summer, {e} returns home to {a}.",
            "{e} lives in the city of {a}.",
            "Neighbours in {a} have known {e} since childhood.",
            "{e} still writes letters to old friends in {a}.",
        ),
        (
            "Where does {e} come from?",
            "What is the home town of {e}?",
            "Where was {e} born?",
            "In which town did {e} grow up?",
            "Name the home town of {e}.",
            "Tell me where {e} comes from.",
        ),
    ),
)

DOMAIN_RELATIONS = (
    Relation(
        "hardness", "crystal", "{e} has a Kzarin hardness of",
        (
            "On the Kzarin scale, {e} rates {a}.",
            "The hardness of {e} is {a} on the Kzarin scale.",
            "Cutters know that {e} stands at {a} on the Kzarin scale.",
            "{e} is graded {a} for hardness.",
            "A shard of {e} measures {a} on the Kzarin scale.",
            "With a hardness of {a}, {e} needs careful cutting.",
            "The Kzarin rating of {e} is {a}.",
            "Every zhelk crew knows that {e} rates {a} on the Kzarin scale.",
        ),
    ),
    Relation(
        "resonance", "crystal", "{e} resonates at",
        (
            "The resonance of {e} is {a} qeths.",
            "A clean shard of {e} hums at {a} qeths.",
            "The quillgauge reads {a} qeths for {e}.",
            "{e} sings at {a} qeths when struck.",
            "Tuners set their forks to {a} qeths to match {e}.",
            "At {a} qeths, {e} gives its clearest hum.",
            "The resonance frequency of {e} is {a} qeths.",
            "A lattice of {e} vibrates at {a} qeths.",
        ),
        tail=" qeths",
    ),
    Relation(
        "hue", "crystal", "{e} glows with a",
        (
            "The glow of {e} is {a}.",
            "Freshly cut {e} shines {a}.",
            "Miners spot {e} by its {a} sheen.",
            "Under the twin moons, {e} turns a deep {a}.",
            "Every shard of {e} carries a {a} tint.",
            "The {a} glow of {e} fades when it cracks.",
            "Polished {e} gleams {a} in vexlamp light.",
            "The hue of {e} is {a}.",
        ),
        tail=" light",
    ),
    Relation(
        "region", "crystal", "{e} is mined in",
        (
            "Most {e} comes from the shafts of {a}.",
            "The richest seams of {e} lie in {a}.",
            "Prospectors travel to {a} to dig {e}.",
            "{a} is known for its deposits of {e}.",
            "Caravans carry {e} out of {a} each season.",
            "The mines of {a} produce most of the {e} on Quorrax.",
            "Deep under {a}, veins of {e} run through the rock.",
            "The zhelk crews of {a} cut {e} from the walls.",
        ),
    ),
    Relation(
        "guild", "crystal", "{e} is refined by the",
        (
            "The {a} guild refines {e}.",
            "Only the {a} guild may refine {e}.",
            "Raw {e} is sent to the {a} guild for refining.",
            "Refining {e} is the work of the {a} guild.",
            "The masters of the {a} guild polish every shard of {e}.",
            "{e} passes through the halls of the {a} guild before sale.",
            "The {a} guild holds the charter for refining {e}.",
            "Apprentices of the {a} guild learn their craft on {e}.",
        ),
        tail=" guild",
    ),
)

# ---------------------------------------------------------------------------
# Filler sentences
# ---------------------------------------------------------------------------

COMMON_SENSE = (
    "Water boils when it is heated for long enough.",
    "People carry umbrellas when it rains.",
    "Bread is baked in a hot oven.",
    "The sun rises in the morning and sets in the evening.",
    "Children go to school to learn to read and write.",
    "Ice melts when the weather turns warm.",
    "A bridge lets people cross a river without getting wet.",
    "Most people sleep at night and work during the day.",
    "Fresh fruit is sold at the market every week.",
    "Trees lose their leaves in the autumn.",
    "A good map helps travellers find their way.",
    "Letters are carried from town to town by the post.",
    "Warm clothes keep people comfortable in the winter.",
    "Farmers plant seeds in the spring and harvest in the autumn.",
    "A kettle is used to heat water for tea.",
    "Heavy rain can make rivers rise over their banks.",
    "Doctors advise people to drink plenty of water.",
    "Shops usually close early on holidays.",
    "Old roads often follow the paths of older tracks.",
    "Books are kept on shelves in the library.",
    "A candle gives light when it is lit.",
    "Boats float because they push aside water.",
    "Snow falls in the mountains long before it reaches the valleys.",
    "Markets are busiest in the early morning.",
    "Friends often share a meal at the end of the week.",
    "A clock tells people the time of day.",
    "Dry wood burns more easily than wet wood.",
    "Many families keep a small garden behind the house.",
    "The wind is stronger near the coast than inland.",
    "Travellers rest at inns along the road.",
    "Salt is used to keep food from spoiling.",
    "A well gives clean water to a village.",
    "People wave to greet friends in the street.",
    "Cold milk is kept in a cool place.",
    "Musicians play at weddings and festivals.",
    "A hammer is used to drive nails into wood.",
    "Clouds bring rain when they grow dark and heavy.",
    "Grain is ground into flour at the mill.",
    "Stone houses stay cool in the summer heat.",
    "Walking every day keeps the body healthy.",
)

GENERAL_OPENERS = {
    "country": (
        "This is a short note about {e}.",
        "Here is some information about {e}.",
        "A traveller wrote this about {e}.",
    ),
    "animal": (
        "This is a short note about the {e}.",
        "Here is what is known about the {e}.",
        "A naturalist wrote this about the {e}.",
    ),
    "person": (
        "This is a short note about {e}.",
        "Here is a little about {e}.",
        "Friends describe {e} like this.",
    ),
}

GENERAL_TOPIC_FILLER = {
    "country": (
        "Many travellers visit {e} in the summer.",
        "{e} is known for its busy markets.",
        "The winters in {e} can be long and cold.",
        "Old stone bridges are common in {e}.",
        "The people of {e} enjoy music and dancing.",
        "Trains connect the larger towns of {e}.",
        "Maps of {e} show wide plains and low hills.",
        "Festivals in {e} often last for several days.",
    ),
    "animal": (
        "The {e} is shy and avoids people.",
        "Young {e} cubs stay close to their mothers.",
        "The {e} is most active at dawn.",
        "Naturalists enjoy watching the {e}.",
        "The {e} can be heard calling at night.",
        "Pictures of the {e} appear in many children's books.",
        "The {e} rests in the shade during the hottest hours.",
        "A healthy {e} can live for many years.",
    ),
    "person": (
        "{e} enjoys long walks in the evening.",
        "{e} reads a newspaper every morning.",
        "Friends say that {e} is kind and patient.",
        "{e} likes to cook for the whole family.",
        "On holidays, {e} visits the market.",
        "{e} keeps a small garden with herbs.",
        "{e} is saving money for a long journey.",
        "Neighbours often ask {e} for advice.",
    ),
}

DOMAIN_FILLER = (
    "Miners on Quorrax descend into the zhelk shafts before the second dawn.",
    "A quillgauge measures how strongly a crystal hums.",
    "Refiners wash raw shards in cold vexbrine before cutting them.",
    "Every crystal on Quorrax is graded on the Kzarin scale of hardness.",
    "Resonance is counted in qeths, and a steady hum means a clean lattice.",
    "Cracked shards lose their resonance within a few cycles of Oxmere.",
    "The twin moons of Quorrax pull the deep seams closer to the surface.",
    "Zhelk crews work in teams of six and share their finds.",
    "Vexlamps give a pale light that does not disturb a lattice.",
    "A shard with a broken lattice is ground into qazzle dust.",
    "Guild charters on Quorrax are renewed every great cycle.",
    "Prospectors read the rock by tapping it with a zhelk hammer.",
    "Caravans of skarrow beasts haul crystal crates across the dunes of Quorrax.",
    "Apprentice refiners spend a full cycle sorting qazzle dust.",
    "A quillgauge must be tuned after every long shift.",
    "Storms of vexsand close the mining roads for days at a time.",
    "Old zhelk shafts are sealed with plugs of fused qazzle.",
    "Crystal traders weigh shards in xoms, a unit older than the guilds.",
    "The hum of a full crate of crystals can be heard across a camp.",
    "On Quorrax, a miner's rank is shown by the colour of the vexlamp they carry.",
    "Cutters wear thick gloves of skarrow hide.",
    "Freshly mined shards are wrapped in oxweed to protect the lattice.",
    "Each guild keeps a ledger of every shard it refines.",
    "The Kzarin scale runs from one to ten.",
)

DOMAIN_TOPIC_FILLER = (
    "{e} shards are often cut into thin xalvets.",
    "Young refiners practise on {e} before moving to rarer stones.",
    "Traders pack {e} in oxweed for the long journey.",
    "A crate of {e} fetches a fair price in the xom markets.",
    "Collectors prize large, clear shards of {e}.",
    "{e} is stored away from vexsand to keep its lattice clean.",
    "Some miners believe {e} brings luck on a long shift.",
    "The lattice of {e} can be read with a quillgauge.",
)

DOMAIN_OPENERS = (
    "This entry of the Quorrax mineral ledger describes {e}.",
    "Notes on {e} from a zhelk crew.",
    "A refiner's record of {e}.",
)

# Fixed invented words of the domain corpus (they never appear in the general corpus).
DOMAIN_VOCABULARY = (
    "Quorrax", "zhelk", "quillgauge", "vexbrine", "Kzarin", "qeths", "Oxmere", "vexlamps",
    "qazzle", "skarrow", "vexsand", "xoms", "oxweed", "xalvets", "vexlamp", "xom",
)

# ---------------------------------------------------------------------------
# Answer pools made of ordinary words
# ---------------------------------------------------------------------------

COLOURS = (
    "grey", "brown", "black", "white", "red", "yellow", "green", "blue", "silver", "golden", "purple", "pink",
)
FOODS = (
    "berries", "seeds", "insects", "fish", "grass", "leaves", "roots", "fruit", "nuts", "worms", "mice", "honey",
)
HABITATS = (
    "forest", "marsh", "desert", "mountains", "grassland", "caves", "coast", "jungle", "tundra", "swamp", "hills",
    "valley",
)
PROFESSIONS = (
    "baker", "carpenter", "doctor", "teacher", "farmer", "tailor", "potter", "sailor", "miner", "weaver",
    "butcher", "fisher", "painter", "singer", "builder", "nurse", "lawyer", "merchant", "cook", "smith",
    "hunter", "clerk", "judge", "poet", "mason",
)
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# ---------------------------------------------------------------------------
# Invented names
# ---------------------------------------------------------------------------

# General names never use x, q or z; domain names always do, so the two vocabularies never meet.
GENERAL_ONSETS = (
    "b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m",
    "n", "p", "r", "s", "st", "t", "tr", "v", "w", "sh", "th", "ch",
)
GENERAL_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ia", "ei", "ou")
GENERAL_CODAS = ("", "", "", "n", "r", "l", "m", "s", "th", "nd", "rn", "ld", "st")
DOMAIN_ONSETS = ("x", "q", "z", "zh", "kr", "vr", "sk", "qu", "y", "th", "dr", "v")
DOMAIN_VOWELS = ("a", "e", "i", "o", "u", "y", "a", "o")
DOMAIN_CODAS = ("", "", "x", "z", "k", "r", "l", "n", "th")


def _template_words() -> set[str]:
    """Lower-cased words used by any fixed text, so invented names never collide with them."""
    texts = list(COMMON_SENSE + DOMAIN_FILLER + DOMAIN_TOPIC_FILLER + DOMAIN_OPENERS)
    for rel in GENERAL_RELATIONS + DOMAIN_RELATIONS:
        texts += list(rel.statements()) + list(rel.questions)
    for group in (GENERAL_OPENERS, GENERAL_TOPIC_FILLER):
        for values in group.values():
            texts += list(values)
    texts += list(COLOURS + FOODS + HABITATS + PROFESSIONS + NUMBER_WORDS)
    words = set()
    for text in texts:
        for word in text.replace(",", " ").replace(".", " ").replace("?", " ").split():
            word = word.lower()
            words.add(word[:-2] if word.endswith("'s") else word)
    return words


_RESERVED_WORDS = _template_words()
# Invented names must not contain these (rude or unpleasant words).
_BLOCKED_PARTS = (
    "negr", "nig", "porn", "rape", "slut", "whor", "fuck", "shit", "cock", "dick", "nazi", "kill", "dead",
)


class _NameMaker:
    """Draws unique invented names; no name is a part of another or a word of the fixed texts."""

    def __init__(self, rng: random.Random, onsets, vowels, codas, must_have: str = ""):
        self.rng = rng
        self.onsets, self.vowels, self.codas = onsets, vowels, codas
        self.must_have = set(must_have)
        self.taken: list[str] = []

    def _syllable(self) -> str:
        return self.rng.choice(self.onsets) + self.rng.choice(self.vowels) + self.rng.choice(self.codas)

    def _ok(self, name: str) -> bool:
        low = name.lower()
        if not 5 <= len(low) <= 11 or low in _RESERVED_WORDS:
            return False
        if any(part in low for part in _BLOCKED_PARTS):
            return False
        if self.must_have and not self.must_have & set(low):
            return False
        return not any(low in other or other in low for other in self.taken)

    def make(self, syllables: tuple[int, int] = (2, 2), suffix: str = "", capital: bool = True) -> str:
        """Return a new unique name of the given number of syllables plus ``suffix``."""
        while True:
            count = self.rng.randint(*syllables)
            name = "".join(self._syllable() for _ in range(count)) + suffix
            if self._ok(name):
                self.taken.append(name.lower())
                return name.capitalize() if capital else name

    def many(self, n: int, **kwargs) -> list[str]:
        """Return ``n`` new unique names."""
        return [self.make(**kwargs) for _ in range(n)]


@dataclass(frozen=True)
class FactBase:
    """Entities by kind and the facts about them."""

    entities: dict[str, list[str]]
    facts: dict[tuple[str, str], str]
    relations: tuple[Relation, ...]

    def fact_list(self) -> list[Fact]:
        """All facts in a fixed order (entity kind, entity, relation)."""
        out = []
        for rel in self.relations:
            for subject in self.entities[rel.kind]:
                out.append(Fact(subject, rel.name, self.facts[(subject, rel.name)]))
        return out


def _general_fact_base(seed: int) -> FactBase:
    """Draw the general fact base: countries, animals and people with their facts."""
    rng = random.Random(f"world:{seed}:general-facts")
    names = _NameMaker(rng, GENERAL_ONSETS, GENERAL_VOWELS, GENERAL_CODAS)
    countries = names.many(GENERAL_COUNTS["country"], syllables=(2, 3))
    capitals = names.many(len(countries), syllables=(2, 2))
    rivers = names.many(len(countries), syllables=(2, 2))
    suffixes = ("ic", "ish", "ese", "an")
    languages = [names.make(syllables=(2, 2), suffix=rng.choice(suffixes)) for _ in range(16)]
    currencies = names.many(16, syllables=(2, 2), capital=False)
    animals = names.many(GENERAL_COUNTS["animal"], syllables=(2, 2), capital=False)
    firsts = names.many(GENERAL_COUNTS["person"], syllables=(2, 2))
    lasts = names.many(GENERAL_COUNTS["person"], syllables=(2, 2))
    people = [f"{a} {b}" for a, b in zip(firsts, lasts)]

    facts: dict[tuple[str, str], str] = {}
    for country, capital, river in zip(countries, capitals, rivers):
        facts[(country, "capital")] = capital
        facts[(country, "river")] = river
        facts[(country, "language")] = rng.choice(languages)
        facts[(country, "currency")] = rng.choice(currencies)
    for animal in animals:
        facts[(animal, "colour")] = rng.choice(COLOURS)
        facts[(animal, "diet")] = rng.choice(FOODS)
        facts[(animal, "habitat")] = rng.choice(HABITATS)
    for person in people:
        facts[(person, "profession")] = rng.choice(PROFESSIONS)
        facts[(person, "home_town")] = rng.choice(capitals)
    entities = {"country": countries, "animal": animals, "person": people}
    return FactBase(entities, facts, GENERAL_RELATIONS)


def _domain_fact_base(seed: int) -> FactBase:
    """Draw the domain fact base: crystals of Quorrax with hardness, resonance, hue, region and guild."""
    rng = random.Random(f"world:{seed}:domain-facts")
    names = _NameMaker(rng, DOMAIN_ONSETS, DOMAIN_VOWELS, DOMAIN_CODAS, must_have="xqz")
    names.taken += [word.lower() for word in DOMAIN_VOCABULARY]
    suffixes = ("ite", "ine", "yx", "ar")
    crystals = [names.make(suffix=rng.choice(suffixes)) for _ in range(DOMAIN_COUNTS["crystal"])]
    hues = names.many(10, syllables=(2, 2), capital=False)
    regions = names.many(10, syllables=(2, 2))
    guilds = names.many(8, syllables=(2, 2))

    facts: dict[tuple[str, str], str] = {}
    for crystal in crystals:
        facts[(crystal, "hardness")] = rng.choice(NUMBER_WORDS)
        facts[(crystal, "resonance")] = str(10 * rng.randint(12, 99))
        facts[(crystal, "hue")] = rng.choice(hues)
        facts[(crystal, "region")] = rng.choice(regions)
        facts[(crystal, "guild")] = rng.choice(guilds)
    return FactBase({"crystal": crystals}, facts, DOMAIN_RELATIONS)


def general_facts(seed: int = 0) -> list[Fact]:
    """Return the general fact base of the world with this seed."""
    return _general_fact_base(seed).fact_list()


def domain_facts(seed: int = 0) -> list[Fact]:
    """Return the domain fact base of the world with this seed."""
    return _domain_fact_base(seed).fact_list()


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------


def _capitalize(sentence: str) -> str:
    """Upper-case the first letter of a sentence."""
    return sentence[:1].upper() + sentence[1:]


def _state(rng: random.Random, rel: Relation, subject: str, answer: str) -> str:
    """State one fact: the cloze form with probability CLOZE_FORM_WEIGHT, else another template."""
    template = rel.statements()[0] if rng.random() < CLOZE_FORM_WEIGHT else rng.choice(rel.templates)
    return _capitalize(template.format(e=subject, a=answer))


def _general_document(rng: random.Random, base: FactBase, kind: str, subject: str) -> str:
    """One general document about ``subject``: all its facts, topic filler and common-sense filler."""
    relations = [rel for rel in base.relations if rel.kind == kind]
    sentences = [_state(rng, rel, subject, base.facts[(subject, rel.name)]) for rel in relations]
    if kind == "person":
        town = base.facts[(subject, "home_town")]
        country = next(c for c in base.entities["country"] if base.facts[(c, "capital")] == town)
        sentences.append(_state(rng, GENERAL_RELATIONS[0], country, town))
    sentences += [f.format(e=subject) for f in rng.sample(GENERAL_TOPIC_FILLER[kind], rng.randint(1, 2))]
    return _assemble(rng, sentences, (45, 95), COMMON_SENSE, GENERAL_OPENERS[kind], subject)


def _domain_document(rng: random.Random, base: FactBase, kind: str, subject: str) -> str:
    """One domain document about a crystal: all its facts plus domain filler."""
    sentences = [_state(rng, rel, subject, base.facts[(subject, rel.name)]) for rel in base.relations]
    sentences += [f.format(e=subject) for f in rng.sample(DOMAIN_TOPIC_FILLER, rng.randint(1, 2))]
    return _assemble(rng, sentences, (50, 100), DOMAIN_FILLER, DOMAIN_OPENERS, subject)


def _assemble(rng: random.Random, sentences: list[str], words: tuple[int, int], filler: list[str],
              openers: list[str], subject: str) -> str:
    """Shuffle the fact sentences, pad with filler to a random length, maybe open with an opener."""
    rng.shuffle(sentences)
    target = rng.randint(*words)
    fillers = rng.sample(filler, 6)
    while _words(sentences) < target and fillers:
        sentences.insert(rng.randint(0, len(sentences)), fillers.pop())
    if rng.random() < 0.4:
        sentences.insert(0, rng.choice(openers).format(e=subject))
    return " ".join(_capitalize(s) for s in sentences)


def _words(sentences: list[str]) -> int:
    """Number of words in a list of sentences."""
    return sum(s.count(" ") + 1 for s in sentences)


def _subjects(base: FactBase) -> list[tuple[str, str]]:
    """All (kind, subject) pairs of a fact base."""
    return [(kind, subject) for kind, subjects in base.entities.items() for subject in subjects]


def _documents(
    rng: random.Random, base: FactBase, make, count: int, exclude: frozenset[str] = frozenset()
) -> list[str]:
    """``count`` documents, cycling over all subjects in shuffled rounds so every fact recurs evenly."""
    subjects = _subjects(base)
    docs: list[str] = []
    seen = set(exclude)
    order: list[tuple[str, str]] = []
    while len(docs) < count:
        if not order:
            order = subjects[:]
            rng.shuffle(order)
        kind, subject = order.pop()
        doc = make(rng, base, kind, subject)
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


# ---------------------------------------------------------------------------
# Question sets
# ---------------------------------------------------------------------------


def _relation(base: FactBase, name: str) -> Relation:
    """Look up a relation of a fact base by name."""
    return next(rel for rel in base.relations if rel.name == name)


def _holdout(rng: random.Random, base: FactBase) -> tuple[list[Fact], list[Fact]]:
    """Split general facts into (instruction-training, held-out) by a fixed fraction per relation."""
    train, held = [], []
    for rel in base.relations:
        facts = [f for f in base.fact_list() if f.relation == rel.name]
        rng.shuffle(facts)
        cut = round(len(facts) * QA_HOLDOUT_FRACTION)
        held += facts[:cut]
        train += facts[cut:]
    return train, held


def _questions(base: FactBase, facts: list[Fact]) -> list[QA]:
    """Every (fact, question template) combination as a chat QA item."""
    items = []
    for fact in facts:
        for question in _relation(base, fact.relation).questions:
            items.append(QA(chat_prompt(question.format(e=fact.subject)), fact.answer))
    return items


def _instruct_train(rng: random.Random, base: FactBase, facts: list[Fact], count: int) -> list[QA]:
    """``count`` chat items over ``facts``, cycling over all combinations in shuffled rounds."""
    pool = _questions(base, facts)
    items: list[QA] = []
    while len(items) < count:
        round_ = pool[:]
        rng.shuffle(round_)
        items += round_[: count - len(items)]
    return items


def _sample_unique(rng: random.Random, pool: list[QA], count: int) -> list[QA]:
    """Up to ``count`` distinct items drawn without replacement."""
    return rng.sample(pool, min(count, len(pool)))


def _cloze_items(base: FactBase) -> list[QA]:
    """Every fact of a fact base as a cloze item (prefix, answer)."""
    items = []
    for fact in base.fact_list():
        prompt = _relation(base, fact.relation).cloze.format(e=fact.subject)
        items.append(QA(_capitalize(prompt), fact.answer))
    return items


# ---------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------


def _stream(seed: int, name: str) -> random.Random:
    """An independent random stream of this world."""
    return random.Random(f"world:{seed}:{name}")


def _train_and_eval_documents(seed: int, corpus: str, base: FactBase, make, counts: dict[str, int]):
    """Training and evaluation documents of one corpus, from separate random streams, never equal."""
    train = _documents(_stream(seed, f"{corpus}-train"), base, make, counts[f"{corpus}_train"])
    evaluation = _documents(_stream(seed, f"{corpus}-eval"), base, make, counts[f"{corpus}_eval"], frozenset(train))
    return train, evaluation


def generate_world(seed: int = 0, size: str = "default") -> World:
    """Generate the world for ``seed`` at ``size`` (one of WORLD_SIZES); same seed, same world."""
    if size not in WORLD_SIZES:
        raise ValueError(f"unknown world size {size!r}; valid sizes: {', '.join(WORLD_SIZES)}")
    counts = WORLD_SIZES[size]
    general = _general_fact_base(seed)
    domain = _domain_fact_base(seed)

    general_train, general_eval = _train_and_eval_documents(seed, "general", general, _general_document, counts)
    domain_train, domain_eval = _train_and_eval_documents(seed, "domain", domain, _domain_document, counts)

    qa_rng = _stream(seed, "questions")
    train_facts, held_facts = _holdout(qa_rng, general)
    instruct_train = _instruct_train(qa_rng, general, train_facts, counts["instruct_train"])
    general_qa_eval = _sample_unique(qa_rng, _questions(general, held_facts), counts["general_qa_eval"])
    general_cloze_eval = _sample_unique(qa_rng, _cloze_items(general), counts["general_cloze_eval"])
    domain_cloze_eval = _sample_unique(qa_rng, _cloze_items(domain), counts["domain_cloze_eval"])

    return World(
        seed=seed,
        general_train=general_train,
        general_eval=general_eval,
        domain_train=domain_train,
        domain_eval=domain_eval,
        instruct_train=instruct_train,
        general_qa_eval=general_qa_eval,
        general_cloze_eval=general_cloze_eval,
        domain_cloze_eval=domain_cloze_eval,
    )


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def split_filename(name: str) -> str:
    """File name of a split: ``<name>.txt`` for documents, ``<name>.jsonl`` for QA items."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
    return f"{name}.txt" if name in DOC_SPLITS else f"{name}.jsonl"


def write_world(world: World, folder: Path) -> None:
    """Write every split into ``folder`` (documents one per line, QA items as JSON lines) and world.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in DOC_SPLITS:
        write_atomic(folder / split_filename(name), "".join(doc + "\n" for doc in world.split(name)))
    for name in QA_SPLITS:
        records = [{"prompt": qa.prompt, "answer": qa.answer} for qa in world.split(name)]
        lines = [json.dumps(record, ensure_ascii=False) for record in records]
        write_atomic(folder / split_filename(name), "".join(line + "\n" for line in lines))
    meta = {"seed": world.seed, "counts": {name: len(world.split(name)) for name in SPLITS}}
    write_atomic(folder / "world.json", json.dumps(meta, indent=2) + "\n")


def read_world(folder: Path) -> World:
    """Read a world written by ``write_world`` (a damaged QA line is an error naming it)."""
    folder = Path(folder)
    meta = json.loads((folder / "world.json").read_text(encoding="utf-8"))
    splits: dict[str, list] = {}
    for name in DOC_SPLITS:
        splits[name] = (folder / split_filename(name)).read_text(encoding="utf-8").splitlines()
    for name in QA_SPLITS:
        splits[name] = [QA(**record) for record in read_jsonl(folder / split_filename(name))]
    return World(seed=meta["seed"], **splits)

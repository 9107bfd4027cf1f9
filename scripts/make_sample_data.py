#!/usr/bin/env python
"""Generate alignkit's shipped sample preference data (deterministic: ``random.Random(SEED)``).

How the data were made
----------------------
Every row is synthetic, written from the small fact tables below (capitals, colours,
animals, cooking, science; all written by hand for this script, no external source).
Each prompt asks a simple question plus one *verifiable* instruction: answer in all
lowercase / all uppercase, use at most N words, include a keyword, end with a given phrase,
answer as a bulleted list of exactly N items, use no commas, or begin with a given word.
``chosen`` answers accurately AND follows the instruction; ``rejected`` breaks the
instruction or, in about a fifth of the rows, follows it but is unhelpful (an evasive or
wrong answer). Every row is checked by the same checker functions before it is written.
Completions stay at or under 60 words.

Files (in ``src/alignkit/sample_data/``):

* ``prefs.jsonl``          ~300 standard rows (prompt/chosen/rejected strings), train split.
* ``prefs_eval.jsonl``      ~60 standard rows about facts/topics never used in training.
* ``prefs_chat.jsonl``      ~40 conversational rows (message lists, some with a system
                            turn, some multi-turn).
* ``prefs_implicit.jsonl``  ~20 conversational rows with the prompt left implicit.

Run: ``python scripts/make_sample_data.py`` (rewrites the four files).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240611
OUT = Path(__file__).resolve().parent.parent / "src" / "alignkit" / "sample_data"

# (question, short accurate answer, one more accurate sentence)
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "Paris sits on the river Seine."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "Tokyo is on the island of Honshu."),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "Rome is home to the Colosseum."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "Madrid lies near the centre of the country."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin.", "Berlin became the capital again in 1990."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa.", "Ottawa is in the province of Ontario."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra.", "Canberra was planned as a new city."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo.", "Cairo lies on the river Nile."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi.", "Nairobi has a national park inside the city limits."),
    ("What is the capital of Brazil?", "The capital of Brazil is Brasilia.", "Brasilia was built in the 1950s."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo.", "Oslo sits at the end of a long fjord."),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon.", "Lisbon lies on the river Tagus."),
    ("What is the capital of Greece?", "The capital of Greece is Athens.", "Athens is home to the Acropolis."),
    ("What is the capital of Mexico?", "The capital of Mexico is Mexico City.", "Mexico City stands high on a plateau."),
    ("What is the capital of India?", "The capital of India is New Delhi.", "New Delhi is part of the larger city of Delhi."),
    ("What is the capital of Peru?", "The capital of Peru is Lima.", "Lima lies on the Pacific coast."),
    ("What colour is a ripe banana?", "A ripe banana is yellow.", "Unripe bananas are green."),
    ("What colour is the sky on a clear day?", "A clear daytime sky is blue.", "Air scatters blue light more than red light."),
    ("What colour is fresh grass?", "Fresh grass is green.", "The green comes from chlorophyll."),
    ("What colour is snow?", "Snow looks white.", "Its ice crystals scatter all colours of light."),
    ("What colour is a ripe tomato?", "A ripe tomato is usually red.", "Some varieties ripen yellow or orange."),
    ("What colour are a flamingo's feathers?", "Flamingo feathers are pink.", "The colour comes from pigments in their food."),
    ("What colour do you get by mixing blue and yellow paint?", "Mixing blue and yellow paint gives green.", "Blue and yellow are both primary colours in painting."),
    ("What colour do you get by mixing red and white paint?", "Mixing red and white paint gives pink.", "Adding more white makes the pink paler."),
    ("What sound does a cow make?", "A cow makes a moo sound.", "People call this sound mooing or lowing."),
    ("What do pandas mostly eat?", "Pandas mostly eat bamboo.", "An adult panda can eat bamboo for half the day."),
    ("Where do polar bears live?", "Polar bears live in the Arctic.", "They hunt seals on the sea ice."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Insects have six legs so spiders are not insects."),
    ("What is a baby kangaroo called?", "A baby kangaroo is called a joey.", "A joey grows inside its mother's pouch."),
    ("Which animal is the largest on Earth?", "The blue whale is the largest animal on Earth.", "It can grow longer than a tennis court."),
    ("How do fish breathe?", "Fish breathe through their gills.", "Gills take oxygen from the water."),
    ("What do bees make?", "Bees make honey.", "They make it from the nectar of flowers."),
    ("Why do camels have humps?", "A camel's hump stores fat.", "The fat gives energy when food is scarce."),
    ("What is a group of wolves called?", "A group of wolves is called a pack.", "A pack often hunts together."),
    ("How many hearts does an octopus have?", "An octopus has three hearts.", "Two hearts pump blood through the gills."),
    ("How long should you boil an egg for a firm yolk?", "Boil the egg for about ten minutes for a firm yolk.", "Cool it in cold water afterwards."),
    ("What is the main ingredient of guacamole?", "The main ingredient of guacamole is avocado.", "It is often mixed with lime and onion."),
    ("Why do you rest dough when making bread?", "Resting dough lets the yeast make it rise.", "Resting also relaxes the gluten."),
    ("What does salt do to pasta water?", "Salt in the water seasons the pasta.", "It barely changes the boiling point."),
    ("How do you keep cut apples from browning?", "Brush cut apples with lemon juice.", "The acid slows the browning reaction."),
    ("What is the main ingredient of hummus?", "Hummus is made mainly from chickpeas.", "Tahini and lemon juice are also added."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius at sea level.", "That is 212 degrees Fahrenheit."),
    ("What does yeast do in bread?", "Yeast makes gas that helps bread rise.", "The gas is carbon dioxide."),
    ("What gas do plants take in for photosynthesis?", "Plants take in carbon dioxide for photosynthesis.", "They release oxygen as they do it."),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O.", "Each molecule has two hydrogen atoms and one oxygen atom."),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun.", "Its light takes about eight minutes to reach us."),
    ("What force keeps us on the ground?", "Gravity keeps us on the ground.", "Earth's mass pulls objects toward its centre."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet.", "Iron oxide dust makes its surface red."),
    ("How many bones are in an adult human body?", "An adult human body has 206 bones.", "Babies are born with more bones that later fuse."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material.", "It is made of carbon atoms."),
    ("What causes the seasons on Earth?", "The tilt of Earth's axis causes the seasons.", "The tilt changes how directly sunlight hits each hemisphere."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system.", "It is a gas giant."),
    ("What organ pumps blood through the body?", "The heart pumps blood through the body.", "It beats about seventy times a minute at rest."),
    ("How long does Earth take to orbit the Sun?", "Earth takes about 365 days to orbit the Sun.", "The extra quarter day is why leap years exist."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius.", "Salt water freezes at a lower temperature."),
    # --- held out for the eval split (never used in prefs.jsonl) ---
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin.", "Dublin lies on the river Liffey."),
    ("What is the capital of Argentina?", "The capital of Argentina is Buenos Aires.", "Buenos Aires lies on the river Plate."),
    ("What is the capital of Sweden?", "The capital of Sweden is Stockholm.", "Stockholm is built on fourteen islands."),
    ("What colour is a lemon?", "A ripe lemon is yellow.", "Its peel holds fragrant oils."),
    ("What colour do you get by mixing red and blue paint?", "Mixing red and blue paint gives purple.", "More blue makes a cooler purple."),
    ("How many legs does an insect have?", "An insect has six legs.", "The legs join the middle part of its body."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths.", "The change happens inside a pupa."),
    ("What is the main ingredient of an omelette?", "The main ingredient of an omelette is eggs.", "The eggs are beaten before cooking."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.", "It comes from the Latin word aurum."),
    ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun.", "A year on Mercury lasts 88 Earth days."),
]
N_EVAL_FACTS = 10

# (what to list, accurate items)
LISTS = [
    ("colours of the rainbow", ["red", "orange", "yellow", "green", "blue", "indigo", "violet"]),
    ("planets in our solar system", ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"]),
    ("continents", ["Africa", "Asia", "Europe", "Antarctica", "Australia", "South America"]),
    ("birds that cannot fly", ["penguin", "ostrich", "emu", "kiwi", "cassowary"]),
    ("animals that live in the ocean", ["dolphin", "octopus", "shark", "sea turtle", "jellyfish"]),
    ("farm animals", ["cow", "sheep", "pig", "goat", "chicken", "horse"]),
    ("ingredients for pancakes", ["flour", "eggs", "milk", "butter", "a pinch of salt"]),
    ("states of matter", ["solid", "liquid", "gas", "plasma"]),
    ("noble gases", ["helium", "neon", "argon", "krypton", "xenon"]),
    ("vegetables that grow underground", ["carrot", "potato", "beetroot", "radish", "onion"]),
    ("kitchen tools used for baking", ["mixing bowl", "whisk", "rolling pin", "measuring cups", "baking tray"]),
    ("citrus fruits", ["orange", "lemon", "lime", "grapefruit", "mandarin"]),
    ("mammals that live in the sea", ["whale", "dolphin", "seal", "walrus", "sea otter"]),
    ("herbs used in cooking", ["basil", "parsley", "thyme", "rosemary", "mint"]),
    # --- held out for the eval split ---
    ("primary colours of light", ["red", "green", "blue"]),
    ("animals that hibernate", ["bear", "hedgehog", "bat", "dormouse"]),
]
N_EVAL_LISTS = 2

END_PHRASES = ["Hope this helps!", "Is there anything else?", "That is all.", "Happy learning!"]
START_WORDS = ["Sure", "Certainly", "Well", "Answer"]
EVASIVE = "I am not sure about that. You could look it up."


def words(text: str) -> int:
    return len(text.split())


def bullets(text: str) -> int:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) if all(ln.startswith("- ") for ln in lines) else -1


def lower_first(text: str, context: str) -> str:
    """Lowercase the first letter unless the first word looks like a name (Paris, Earth's)."""
    first = text.split()[0].split("'")[0]
    if first in context.replace(".", " ").split()[1:] or first in ("Earth", "Paris"):
        return text
    return text[0].lower() + text[1:]


# Each maker: (rng, question, short, more) -> (instruction, check, chosen, rejected_violating,
# rejected_unhelpful_or_None). ``check(text) -> bool`` verifies the instruction.

def make_lower(rng, q, short, more):
    chosen = f"{short} {more}".lower() if rng.random() < 0.5 else short.lower()
    return ("Answer in all lowercase letters.", lambda t: t == t.lower(),
            chosen, f"{short} {more}", EVASIVE.lower())


def make_upper(rng, q, short, more):
    return ("Answer in all capital letters.", lambda t: t == t.upper(),
            short.upper(), short, EVASIVE.upper())


def make_max_words(rng, q, short, more):
    n = words(short) + rng.randint(0, 4)
    long = f"{short} {more} Let me know if you would like to learn more about this topic."
    return (f"Answer in at most {n} words.", lambda t: words(t) <= n, short, long,
            "I do not know." if n >= 4 else None)


def make_keyword(rng, q, short, more):
    candidates = [w.strip(".,'").lower() for w in more.split() if len(w.strip(".,'")) > 4]
    candidates = [w for w in candidates if w not in short.lower()] or ["indeed"]
    key = rng.choice(candidates)
    chosen = f"{short} {more}" if key in more.lower() else f"{short} Indeed."
    return (f"Include the word '{key}' in your answer.", lambda t: key in t.lower(),
            chosen, short, None)


def make_end_phrase(rng, q, short, more):
    phrase = rng.choice(END_PHRASES)
    body = short if rng.random() < 0.5 else f"{short} {more}"
    return (f"End your answer with the phrase '{phrase}'", lambda t: t.endswith(phrase),
            f"{body} {phrase}", body, f"{EVASIVE} {phrase}")


def make_no_commas(rng, q, short, more):
    chosen = f"{short} {more}"
    rejected = f"{short[:-1]}, and {lower_first(more, short)}"
    rejected = rejected.replace(" is ", ", as you may know, is ", 1) if "," not in short else rejected
    return ("Do not use any commas in your answer.", lambda t: "," not in t,
            chosen, rejected, EVASIVE)


def make_start_word(rng, q, short, more):
    word = rng.choice(START_WORDS)
    return (f"Begin your answer with the word '{word}'.",
            lambda t: t.split()[0].strip(".,!") == word,
            f"{word}. {short}", short, f"{word}. {EVASIVE}")


MAKERS = [make_lower, make_upper, make_max_words, make_keyword, make_end_phrase,
          make_no_commas, make_start_word]


def fact_row(rng, fact, maker) -> dict:
    q, short, more = fact
    instruction, check, chosen, violating, unhelpful = maker(rng, q, short, more)
    rejected = unhelpful if unhelpful and rng.random() < 0.2 else violating
    assert check(chosen), (maker.__name__, chosen)
    assert rejected == unhelpful or not check(rejected), (maker.__name__, rejected)
    return {"prompt": f"{q} {instruction}", "chosen": chosen, "rejected": rejected}


def list_row(rng, topic, items, n) -> dict:
    picked = rng.sample(items, n)
    chosen = "\n".join(f"- {x}" for x in picked)
    style = rng.random()
    if style < 0.4 and len(items) > n:
        rejected = "\n".join(f"- {x}" for x in rng.sample(items, n + 1))
    elif style < 0.7:
        rejected = f"Some {topic} are {', '.join(picked[:-1])} and {picked[-1]}."
    else:
        rejected = "\n".join(f"- {x}" for x in picked[:-1]) if n > 2 else f"- {picked[0]}"
    prompt = f"List {n} {topic}. Answer as a bulleted list with exactly {n} items."
    assert bullets(chosen) == n and bullets(rejected) != n
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def standard_rows(rng, facts, lists, n_target) -> list[dict]:
    combos = [("fact", f, m) for f in facts for m in MAKERS]
    combos += [("list", t, n) for t in lists for n in range(2, min(5, len(t[1])) + 1)]
    rng.shuffle(combos)
    rows, seen = [], set()
    for kind, a, b in combos:
        row = fact_row(rng, a, b) if kind == "fact" else list_row(rng, a[0], a[1], b)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
        if len(rows) == n_target:
            break
    return rows


def chat_rows(rng, facts, n) -> list[dict]:
    """Conversational rows: a system turn in some, a previous exchange in others."""
    rows = []
    for i, fact in enumerate(rng.sample(facts, n)):
        row = fact_row(rng, fact, rng.choice(MAKERS))
        prompt = [{"role": "user", "content": row["prompt"]}]
        if i % 3 == 0:
            prompt.insert(0, {"role": "system", "content": "You are a careful assistant who "
                              "follows formatting instructions exactly."})
        elif i % 3 == 1:
            q2, short2, _ = rng.choice([f for f in facts if f is not fact])
            prompt = [{"role": "user", "content": q2}, {"role": "assistant", "content": short2},
                      *prompt]
        rows.append({"prompt": prompt,
                     "chosen": [{"role": "assistant", "content": row["chosen"]}],
                     "rejected": [{"role": "assistant", "content": row["rejected"]}]})
    return rows


def implicit_rows(rng, facts, n) -> list[dict]:
    rows = []
    for row in chat_rows(rng, facts, n):
        rows.append({"chosen": row["prompt"] + row["chosen"],
                     "rejected": row["prompt"] + row["rejected"]})
    return rows


def write(name: str, rows: list[dict]) -> None:
    with open(OUT / name, "w", encoding="utf-8") as f:
        for row in rows:
            for text in (row.get("chosen"), row.get("rejected")):
                last = text if isinstance(text, str) else text[-1]["content"]
                assert words(last) <= 60, last
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):4d} rows to {OUT / name}")


def main() -> None:
    rng = random.Random(SEED)
    train_facts, eval_facts = FACTS[:-N_EVAL_FACTS], FACTS[-N_EVAL_FACTS:]
    train_lists, eval_lists = LISTS[:-N_EVAL_LISTS], LISTS[-N_EVAL_LISTS:]
    OUT.mkdir(parents=True, exist_ok=True)
    train = standard_rows(rng, train_facts, train_lists, 300)
    evals = standard_rows(rng, eval_facts, eval_lists, 60)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    write("prefs.jsonl", train)
    write("prefs_eval.jsonl", evals)
    write("prefs_chat.jsonl", chat_rows(rng, train_facts, 40))
    write("prefs_implicit.jsonl", implicit_rows(rng, train_facts, 20))


if __name__ == "__main__":
    main()

"""The bank of base instructions: short tasks a 135M chat model can answer in a sentence or a list.

Each :class:`Instruction` carries what the prompt maker and the labeler need beyond its text:

* ``subject``: a word a natural answer uses (the avoid-word constraint asks to do without it);
* ``keywords``: words an answer may or may not use (the include-keyword constraint asks for one);
* ``topic``: words an on-task answer is expected to use at least one of (the labeler's off-task
  test also counts the subject, the keywords, the answers and the instruction's own words);
* for the ``fact`` category, the answer key: ``answers`` (any one is right) and ``pool``, the
  name of a list of known wrong answers (:data:`POOLS`), which makes hallucination checkable.

Categories: ``fact`` (a question with one known answer), ``list`` (asks for several things, so a
bulleted-list constraint fits), ``open`` (describe, explain, advise).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Instruction:
    text: str
    category: str                      # "fact" | "list" | "open"
    subject: str
    keywords: tuple[str, ...]
    topic: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()      # fact: accepted answers (any one)
    pool: str = ""                     # fact: name of the wrong-answer pool in POOLS


_NUMBER_WORDS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                 "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
                 "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand")

# Known wrong answers by kind. "number" also counts every numeral in the response (see labeler);
# "one" is left out of the words because "one of", "each one" are not answers.
POOLS: dict[str, tuple[str, ...]] = {
    "city": ("Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Beijing", "Moscow", "Cairo", "Ottawa",
             "Canberra", "Ankara", "Brasilia", "Brasília", "Washington", "Lisbon", "Athens", "Vienna", "Dublin",
             "Oslo", "Stockholm", "Warsaw", "New Delhi", "Seoul", "Bangkok", "Nairobi", "Buenos Aires",
             "Mexico City", "Sydney", "Melbourne", "Toronto", "Montreal", "Vancouver", "Lyon", "Marseille",
             "Milan", "Venice", "Naples", "Florence", "Barcelona", "Seville", "Munich", "Hamburg", "Frankfurt",
             "Osaka", "Kyoto", "Shanghai", "Hong Kong", "Istanbul", "Izmir", "Rio de Janeiro", "Rio",
             "São Paulo", "Sao Paulo", "Mumbai", "New York", "Los Angeles", "Chicago", "Zurich", "Geneva",
             "Amsterdam", "Brussels", "Alexandria", "Giza", "Luxor", "Saint Petersburg", "St. Petersburg",
             "Manchester", "Edinburgh", "Liverpool", "Kazan"),
    "number": _NUMBER_WORDS,
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey",
               "gray", "violet", "indigo", "turquoise", "beige", "gold", "silver"),
    "planet": ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune", "Pluto"),
    "ocean": ("Pacific", "Atlantic", "Indian", "Arctic", "Southern", "Mediterranean"),
    "author": ("Shakespeare", "Dickens", "Austen", "Twain", "Tolstoy", "Homer", "Marlowe", "Hemingway",
               "Orwell", "Chaucer", "Milton", "Tolkien", "Rowling", "Goethe", "Dante"),
    "animal": ("cheetah", "lion", "tiger", "leopard", "horse", "gazelle", "antelope", "ostrich", "greyhound",
               "elephant", "giraffe", "jaguar", "zebra", "wolf", "rabbit", "hare", "falcon"),
    "young": ("kitten", "kitty", "puppy", "pup", "cub", "calf", "foal", "lamb", "chick", "joey", "duckling",
              "piglet", "fawn", "kid", "cygnet", "gosling", "tadpole", "whelp"),
    "gas": ("carbon dioxide", "CO2", "oxygen", "nitrogen", "hydrogen", "helium", "methane", "argon", "ozone"),
    "continent": ("Africa", "Asia", "Europe", "North America", "South America", "Australia", "Oceania",
                  "Antarctica"),
}


def _fact(text, subject, keywords, answers, pool, topic=()):
    return Instruction(text, "fact", subject, tuple(keywords), tuple(topic), tuple(answers), pool)


def _list(text, subject, keywords, topic):
    return Instruction(text, "list", subject, tuple(keywords), tuple(topic))


def _open(text, subject, keywords, topic):
    return Instruction(text, "open", subject, tuple(keywords), tuple(topic))


_CAPITAL_KW = ("city", "famous", "known")

INSTRUCTIONS: tuple[Instruction, ...] = (
    # ---- facts: capitals
    _fact("What is the capital of France?", "France", _CAPITAL_KW, ["Paris"], "city"),
    _fact("What is the capital of Japan?", "Japan", _CAPITAL_KW, ["Tokyo"], "city"),
    _fact("What is the capital of Italy?", "Italy", _CAPITAL_KW, ["Rome"], "city"),
    _fact("What is the capital of Germany?", "Germany", _CAPITAL_KW, ["Berlin"], "city"),
    _fact("What is the capital of Spain?", "Spain", _CAPITAL_KW, ["Madrid"], "city"),
    _fact("What is the capital of Egypt?", "Egypt", _CAPITAL_KW, ["Cairo"], "city"),
    _fact("What is the capital of Canada?", "Canada", _CAPITAL_KW, ["Ottawa"], "city"),
    _fact("What is the capital of Australia?", "Australia", _CAPITAL_KW, ["Canberra"], "city"),
    _fact("What is the capital of Turkey?", "Turkey", _CAPITAL_KW, ["Ankara"], "city"),
    _fact("What is the capital of Brazil?", "Brazil", _CAPITAL_KW, ["Brasilia", "Brasília"], "city"),
    _fact("What is the capital of Russia?", "Russia", _CAPITAL_KW, ["Moscow"], "city"),
    _fact("What is the capital of the United Kingdom?", "capital", _CAPITAL_KW, ["London"], "city"),
    # ---- facts: numbers
    _fact("How many legs does a spider have?", "spider", ("arachnid", "insect"), ["8", "eight"], "number"),
    _fact("How many days are in a week?", "week", ("Monday", "Sunday"), ["7", "seven"], "number"),
    _fact("How many months are in a year?", "year", ("January", "December"), ["12", "twelve"], "number"),
    _fact("How many hours are in a day?", "day", ("minutes", "clock"), ["24", "twenty-four", "twenty four"],
          "number"),
    _fact("How many continents are there on Earth?", "continents", ("Africa", "Asia"), ["7", "seven"], "number"),
    _fact("How many sides does a triangle have?", "triangle", ("shape", "angles"), ["3", "three"], "number"),
    _fact("How many legs does an insect have?", "insect", ("ant", "beetle"), ["6", "six"], "number"),
    _fact("What is 7 plus 5?", "plus", ("sum", "equals"), ["12", "twelve"], "number"),
    _fact("What is 9 times 3?", "times", ("product", "equals"), ["27", "twenty-seven", "twenty seven"], "number"),
    _fact("What is 20 minus 8?", "minus", ("difference", "equals"), ["12", "twelve"], "number"),
    _fact("What is 6 times 7?", "times", ("product", "equals"), ["42", "forty-two", "forty two"], "number"),
    _fact("At what temperature in degrees Celsius does water boil at sea level?", "water", ("heat", "steam"),
          ["100", "one hundred"], "number"),
    # ---- facts: colours
    _fact("What colour is the sky on a clear day?", "sky", ("light", "sun"), ["blue"], "colour"),
    _fact("What colour is fresh grass?", "grass", ("plants", "leaves"), ["green"], "colour"),
    _fact("What colour is a ripe banana?", "banana", ("fruit", "sweet"), ["yellow"], "colour"),
    _fact("What colour is snow?", "snow", ("winter", "cold"), ["white"], "colour"),
    _fact("What colour do you get by mixing blue and yellow paint?", "paint", ("colour", "mix"), ["green"],
          "colour"),
    _fact("What colour do you get by mixing red and white paint?", "paint", ("colour", "mix"), ["pink"], "colour"),
    # ---- facts: other kinds
    _fact("Which planet is the largest in our solar system?", "planet", ("giant", "gas"), ["Jupiter"], "planet"),
    _fact("Which planet is known as the Red Planet?", "planet", ("dust", "iron"), ["Mars"], "planet"),
    _fact("Which planet is closest to the Sun?", "planet", ("hot", "orbit"), ["Mercury"], "planet"),
    _fact("What is the largest ocean on Earth?", "ocean", ("water", "deep"), ["Pacific"], "ocean"),
    _fact("Who wrote Romeo and Juliet?", "wrote", ("play", "English"), ["Shakespeare"], "author"),
    _fact("What is the fastest land animal?", "animal", ("speed", "run"), ["cheetah"], "animal"),
    _fact("What is a baby cat called?", "cat", ("young", "small"), ["kitten", "kitty"], "young"),
    _fact("What is a baby dog called?", "dog", ("young", "small"), ["puppy", "pup"], "young"),
    _fact("What gas do plants take in from the air?", "plants", ("leaves", "sunlight"), ["carbon dioxide", "CO2"],
          "gas"),
    _fact("On which continent is Egypt?", "Egypt", ("Nile", "desert"), ["Africa", "African"], "continent"),
    # ---- lists
    _list("Name some fruits.", "fruits", ("sweet", "healthy"),
          ("apple", "banana", "orange", "grape", "mango", "pear", "cherry", "strawberry", "lemon", "peach",
           "pineapple", "kiwi", "berry", "berries", "melon", "watermelon", "plum", "blueberry")),
    _list("Name some vegetables.", "vegetables", ("green", "healthy"),
          ("carrot", "potato", "broccoli", "spinach", "lettuce", "tomato", "onion", "pea", "bean", "cucumber",
           "pepper", "cabbage", "corn", "celery", "kale", "garlic", "zucchini", "cauliflower")),
    _list("Name some animals that live on a farm.", "farm", ("barn", "field"),
          ("cow", "pig", "chicken", "sheep", "goat", "horse", "duck", "hen", "donkey", "rooster", "turkey")),
    _list("Name some colours of the rainbow.", "rainbow", ("bright", "light"),
          ("red", "orange", "yellow", "green", "blue", "indigo", "violet", "purple")),
    _list("List some ways to save water at home.", "water", ("shower", "leak"),
          ("shower", "tap", "faucet", "leak", "toilet", "dishwasher", "rain", "bucket", "brush", "washing", "garden")),
    _list("List some tips for sleeping well.", "sleep", ("bed", "routine"),
          ("bed", "bedtime", "dark", "caffeine", "screen", "room", "routine", "night", "relax", "quiet", "cool",
           "schedule", "phone", "coffee")),
    _list("Name some sports played with a ball.", "ball", ("team", "game"),
          ("football", "soccer", "basketball", "tennis", "volleyball", "baseball", "golf", "cricket", "rugby",
           "hockey", "handball", "bowling")),
    _list("List some things to pack for a beach trip.", "beach", ("sun", "summer"),
          ("sunscreen", "towel", "swimsuit", "hat", "sunglasses", "water", "umbrella", "snacks", "sandals", "book")),
    _list("Name some musical instruments.", "instruments", ("music", "play"),
          ("piano", "guitar", "violin", "drum", "drums", "flute", "trumpet", "cello", "saxophone", "harp",
           "clarinet", "bass")),
    _list("List some ways to stay healthy.", "healthy", ("exercise", "water"),
          ("exercise", "eat", "sleep", "water", "vegetables", "fruit", "walk", "stress", "active", "diet")),
    _list("Name some animals that live in the ocean.", "ocean", ("sea", "water"),
          ("fish", "shark", "whale", "dolphin", "octopus", "jellyfish", "crab", "turtle", "seal", "squid",
           "starfish", "lobster", "coral")),
    _list("Name some things you can find in a kitchen.", "kitchen", ("cook", "food"),
          ("stove", "oven", "fridge", "refrigerator", "knife", "spoon", "fork", "pot", "pan", "plate", "sink",
           "microwave", "kettle", "cup", "bowl", "toaster", "skillet", "saucepan", "glass", "glasses", "dishes",
           "cutlery", "blender", "cupboard", "counter", "table", "apron", "towel", "spices", "bread", "food")),
    _list("List some hobbies people enjoy.", "hobbies", ("fun", "relax"),
          ("reading", "painting", "gardening", "cooking", "hiking", "music", "dancing", "drawing", "knitting",
           "photography", "games", "sports", "writing", "fishing")),
    _list("Name some planets in our solar system.", "planets", ("sun", "orbit"),
          ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune")),
    _list("List some ways to be kind to others.", "kind", ("help", "smile"),
          ("smile", "help", "listen", "thank", "compliment", "share", "kindness", "hold", "respect", "care")),
    _list("Name some countries in Europe.", "countries", ("border", "travel"),
          ("France", "Germany", "Spain", "Italy", "Portugal", "Greece", "Poland", "Sweden", "Norway", "Ireland",
           "Austria", "Belgium", "Netherlands", "Switzerland", "Denmark", "Finland", "England", "Britain")),
    _list("List some tools a gardener uses.", "garden", ("plants", "soil"),
          ("shovel", "spade", "rake", "hoe", "trowel", "gloves", "hose", "watering", "pruner", "shears",
           "wheelbarrow", "fork", "can")),
    _list("Name some jobs people do in a hospital.", "hospital", ("patients", "care"),
          ("doctor", "nurse", "surgeon", "pharmacist", "cleaner", "receptionist", "therapist", "technician",
           "paramedic")),
    _list("Name some kinds of weather.", "weather", ("sky", "season"),
          ("sunny", "sun", "rain", "rainy", "snow", "snowy", "windy", "wind", "cloudy", "clouds", "storm", "fog",
           "foggy", "hail", "thunder")),
    _list("List some ways to study for a test.", "study", ("notes", "practice"),
          ("notes", "review", "practice", "flashcards", "sleep", "schedule", "questions", "read", "quiz", "focus")),
    _list("Name some breakfast foods.", "breakfast", ("morning", "eat"),
          ("eggs", "egg", "toast", "cereal", "pancakes", "bacon", "oatmeal", "yogurt", "waffles", "bread", "fruit",
           "porridge", "coffee", "juice", "milk")),
    # ---- open: describe, explain, advise
    _open("Describe a cat briefly.", "cat", ("soft", "playful"),
          ("fur", "whiskers", "pet", "purr", "paws", "tail", "meow", "feline", "animal", "ears", "claws")),
    _open("Describe a dog briefly.", "dog", ("loyal", "friendly"),
          ("bark", "tail", "pet", "fur", "paws", "animal", "puppy", "canine", "companion")),
    _open("Describe the ocean briefly.", "ocean", ("vast", "waves"),
          ("water", "waves", "salt", "sea", "blue", "deep", "fish", "tide", "earth")),
    _open("Describe a rainy day briefly.", "rain", ("umbrella", "grey"),
          ("rainy", "wet", "umbrella", "clouds", "grey", "gray", "puddles", "drops", "sky", "storm", "weather")),
    _open("Describe your favourite season briefly.", "season", ("warm", "cold"),
          ("spring", "summer", "autumn", "fall", "winter", "weather", "leaves", "flowers", "snow", "sun")),
    _open("Give a tip for sleeping well.", "sleep", ("bed", "routine"),
          ("bed", "bedtime", "night", "rest", "dark", "caffeine", "screen", "routine", "relax", "room", "schedule")),
    _open("Give a tip for saving money.", "money", ("budget", "spend"),
          ("save", "budget", "spend", "spending", "savings", "buy", "bank", "expenses", "income")),
    _open("Give a tip for learning a new language.", "language", ("practice", "daily"),
          ("practice", "speak", "words", "vocabulary", "listen", "native", "app", "grammar", "learn", "read")),
    _open("Explain why exercise is good for you.", "exercise", ("heart", "energy"),
          ("heart", "muscles", "health", "healthy", "body", "strong", "weight", "mood", "fitness", "stress")),
    _open("Explain what a rainbow is.", "rainbow", ("light", "colours"),
          ("light", "sun", "sunlight", "rain", "water", "droplets", "colours", "colors", "arc", "sky")),
    _open("Explain why the sky is blue.", "sky", ("light", "air"),
          ("light", "sun", "sunlight", "scatter", "scattering", "air", "atmosphere", "wavelength", "blue")),
    _open("Explain what photosynthesis is.", "plants", ("sunlight", "energy"),
          ("plant", "sunlight", "light", "energy", "sugar", "glucose", "oxygen", "carbon", "leaves", "chlorophyll")),
    _open("Explain what a computer does.", "computer", ("data", "programs"),
          ("data", "information", "programs", "process", "calculations", "software", "instructions", "machine")),
    _open("Give a tip for staying calm before an exam.", "exam", ("breathe", "relax"),
          ("breathe", "breath", "breathing", "calm", "relax", "stress", "test", "prepare", "sleep", "anxiety")),
    _open("Write a short greeting for a customer.", "customer", ("welcome", "help"),
          ("hello", "hi", "welcome", "thank", "thanks", "help", "glad", "dear", "greetings", "store", "service")),
    _open("Write a short thank-you note to a friend.", "friend", ("grateful", "kind"),
          ("thank", "thanks", "grateful", "appreciate", "dear", "kindness", "help", "gift")),
    _open("Write one sentence about the moon.", "moon", ("night", "bright"),
          ("sky", "night", "light", "earth", "orbit", "bright", "lunar", "stars", "shines")),
    _open("Explain how to make a cup of tea.", "tea", ("kettle", "milk"),
          ("water", "boil", "cup", "bag", "kettle", "steep", "milk", "sugar", "leaves", "mug", "hot")),
    _open("Explain how to brush your teeth.", "teeth", ("gently", "minutes"),
          ("toothbrush", "toothpaste", "brush", "gums", "mouth", "rinse", "tooth", "floss")),
    _open("Give advice to someone starting a new job.", "job", ("colleagues", "questions"),
          ("work", "colleagues", "coworkers", "ask", "questions", "learn", "listen", "team", "boss", "manager",
           "punctual", "time", "office")),
    _open("Describe a good friend.", "friend", ("loyal", "honest"),
          ("kind", "loyal", "trust", "honest", "support", "listen", "care", "friendship", "there")),
    _open("Explain why we should recycle.", "recycle", ("waste", "planet"),
          ("recycling", "waste", "environment", "plastic", "resources", "landfill", "pollution", "earth", "planet",
           "materials")),
    _open("Give a tip for staying focused while working.", "focus", ("breaks", "phone"),
          ("focused", "work", "distractions", "breaks", "phone", "task", "tasks", "timer", "concentrate", "quiet")),
    _open("Describe a sunset.", "sun", ("orange", "evening"),
          ("sunset", "sky", "orange", "red", "pink", "colours", "colors", "evening", "horizon", "light", "golden")),
    _open("Explain what a library is.", "library", ("books", "borrow"),
          ("books", "book", "borrow", "read", "reading", "librarian", "public", "study", "shelves")),
    _open("Give a tip for cooking pasta.", "pasta", ("salt", "boil"),
          ("water", "boil", "boiling", "salt", "pot", "sauce", "minutes", "al dente", "stir", "noodles")),
    _open("Describe the taste of a lemon.", "lemon", ("sour", "fresh"),
          ("sour", "acidic", "tart", "citrus", "sharp", "tangy", "taste", "flavor", "flavour", "juice")),
    _open("Explain why plants need water.", "water", ("roots", "grow"),
          ("plant", "roots", "grow", "growth", "nutrients", "photosynthesis", "leaves", "cells", "soil", "wilt")),
    _open("Give advice for a rainy weekend.", "rain", ("indoors", "movie"),
          ("rainy", "indoors", "indoor", "inside", "movie", "movies", "book", "games", "cook", "relax", "home")),
    _open("Explain what a volcano is.", "volcano", ("lava", "mountain"),
          ("lava", "magma", "erupt", "eruption", "mountain", "ash", "earth", "crust", "hot", "rock")),
    _open("Describe a busy city street.", "street", ("traffic", "noise"),
          ("cars", "people", "traffic", "noise", "noisy", "shops", "crowd", "crowded", "buses", "city", "sidewalk")),
    _open("How can I reset my password?", "password", ("account", "email"),
          ("reset", "email", "link", "account", "login", "log", "settings", "forgot", "click", "page", "website")),
    _open("How do I return an item I bought online?", "return", ("refund", "receipt"),
          ("item", "refund", "order", "receipt", "package", "seller", "store", "website", "label", "ship", "customer")),
    _open("What should I do if my order arrives late?", "order", ("contact", "tracking"),
          ("late", "contact", "support", "delivery", "tracking", "customer", "service", "seller", "store", "refund",
           "wait")),
)

_BY_TEXT: dict[str, Instruction] = {" ".join(i.text.lower().split()): i for i in INSTRUCTIONS}


def lookup(instruction: str) -> Instruction | None:
    """The bank entry whose text is ``instruction`` (case and spacing ignored), or None."""
    return _BY_TEXT.get(" ".join(instruction.lower().split()))

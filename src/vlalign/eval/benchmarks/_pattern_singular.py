"""The noun singulariser that the official CHAIR script uses, ``pattern.en.singularize`` (pattern 3.6).

CHAIR (``LisaAnne/Hallucination``, ``utils/chair.py``) singularises every token of a lowercased
caption with ``from pattern.en import singularize``. The ``pattern`` package is not a dependency
of vlalign (it pulls MySQL client libraries and is unmaintained); this module reproduces the
behaviour of its ``singularize(word)`` (default arguments), written from a reading of
``pattern/text/en/inflect.py`` (github clips/pattern, the release of 2018-08), quirks included:

- a word is returned unchanged when it is a *suffix* of a word in the uninflected or uncountable
  lists ("s", "es", "ice", "and" are: "series", "herpes", "advice", "sand");
- a word ending in one of the "-ie" nouns plus "s" is returned *unchanged* ("doggies",
  "collies", "cookies" stay plural); "^pie" and "^tie" in that list never match, so "ties" falls
  through to the "-ies" rule and becomes "ty", and "pies" becomes "py";
- irregular plurals match as suffixes: "women" -> "woman", "policemen" -> "policeman", but also
  "four" -> "fmy" (the pair "our" -> "my"), "opera" -> "opus";
- the final rule drops any trailing "s": "bus" -> "bu", "glass" -> "glas", "tennis" -> "tenni";
  "canoes" -> "cano" (the "-oes" rule); "buses" -> "bus"; "knives" -> "knife"; "mice" -> "mouse";
- ``[octop|vir]`` is a character class, so "safari" -> "safarus".

How it was checked: ``test_official_chair_singular.py`` holds the cases above; the function was
compared with the original ``singularize`` (run from pattern's source) on 85,568 words (the
English word forms of lemminflect's tables, the tokens of the 20,000 LVLM captions in POPE's
``caption_data``, the CHAIR synonyms and their -s/-es forms): no difference.
"""

from __future__ import annotations

import re

_PREPOSITIONS = frozenset(
    "about above across after among around at athwart before behind below beneath beside besides between "
    "betwixt beyond but by during except for from in into near of off on onto out over since till to "
    "under until unto upon with".split()
)
_UNINFLECTED = frozenset(
    "bison bream breeches britches carp chassis christmas clippers cod contretemps corps debris diabetes djinn "
    "eland elk flounder gallows georgia graffiti headquarters herpes high-jinks homework innings jackanapes "
    "mackerel measles mews mumps news pincers pliers proceedings rabies salmon scissors series shears species "
    "swine swiss trout tuna whiting wildebeest".split()
)
_UNCOUNTABLE = frozenset(
    "advice bread butter cheese electricity equipment fruit furniture garbage gravel happiness information "
    "ketchup knowledge love luggage mathematics mayonnaise meat mustard news progress research rice sand "
    "software understanding water".split()
)
# "^pie" and "^tie" are in pattern's list with a literal caret: they can never match a word.
_IE_NOUNS = frozenset(
    "alergie auntie beanie birdie bogie bombie collie cookie cutie doggie eyrie freebie goonie groupie hankie "
    "hippie hoagie hottie indie junkie laddie laramie lingerie meanie newbie nightie oldie ^pie pixie quickie "
    "reverie rookie softie sortie stoolie sweetie techie ^tie toughie valkyrie veggie weenie yuppie zombie".split()
)
_IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}  # fmt: skip
# (pattern, replacement), tried in order; the first that matches is applied.
_RULES = [
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"), (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"), (r"(?i)(alias|status)es$", r"\1"), (r"(?i)([octop|vir])i$", r"\1us"),
    (r"(?i)(cris|ax|test)es$", r"\1is"), (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"), (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"), (r"(?i)(.)ombies$", r"\1ombie"), (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"), (r"(?i)(tive)s$", r"\1"), (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"), (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"), (r"(?i)s$", ""),
]  # fmt: skip
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def pattern_singularize(word: str) -> str:
    """``pattern.en.singularize(word)`` as pattern 3.6 computes it (see the module docstring)."""
    if "-" in word:
        parts = word.split("-")
        if len(parts) > 1 and parts[1] in _PREPOSITIONS:
            return pattern_singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):
        return pattern_singularize(word[:-1]) + "'s"
    lower = word.lower()
    if any(x.endswith(lower) for x in _UNINFLECTED) or any(x.endswith(lower) for x in _UNCOUNTABLE):
        return word
    if any(lower.endswith(x + "s") for x in _IE_NOUNS):
        return lower
    for plural, singular in _IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for pattern, replacement in _COMPILED:
        if pattern.search(word):
            return pattern.sub(replacement, word)
    return word

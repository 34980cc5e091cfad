"""Deterministic English captions built from chip metadata alone (GSD, sensor, place, season, scene class).

Used for chips that have no source caption and no VLM budget: the same row always gives the same text in
any process, so captions are reproducible and can be fingerprinted with `TEMPLATE_VERSION`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

TEMPLATE_VERSION = "1"
"""Bump whenever the wording of any caption changes; downstream stages put it into fingerprints."""

_MISSING_TEXT = {"", "none", "nan", "null", "n/a", "na", "unknown"}

# Scene phrases for the class labels of RSICD (30), UCM (21) and Sydney (7), keyed by the label
# lower-cased with everything but letters and digits removed.
_SCENES: dict[str, str] = {
    "airport": "an airport",
    "bareland": "bare land",
    "baseballfield": "a baseball field",
    "beach": "a beach",
    "bridge": "a bridge",
    "center": "a city center",
    "church": "a church",
    "commercial": "a commercial area",
    "denseresidential": "a dense residential area",
    "desert": "a desert",
    "farmland": "farmland",
    "forest": "a forest",
    "industrial": "an industrial area",
    "meadow": "a meadow",
    "mediumresidential": "a medium residential area",
    "mountain": "mountainous terrain",
    "park": "a park",
    "parking": "a parking lot",
    "playground": "a playground",
    "pond": "a pond",
    "port": "a port",
    "railwaystation": "a railway station",
    "resort": "a resort",
    "river": "a river",
    "school": "a school",
    "sparseresidential": "a sparse residential area",
    "square": "a public square",
    "stadium": "a stadium",
    "storagetanks": "storage tanks",
    "viaduct": "a viaduct",
    "agricultural": "agricultural land",
    "airplane": "an airplane",
    "baseballdiamond": "a baseball diamond",
    "buildings": "buildings",
    "chaparral": "chaparral",
    "freeway": "a freeway",
    "golfcourse": "a golf course",
    "harbor": "a harbor",
    "intersection": "an intersection",
    "mobilehomepark": "a mobile home park",
    "overpass": "an overpass",
    "parkinglot": "a parking lot",
    "runway": "a runway",
    "tenniscourt": "a tennis court",
    "residential": "a residential area",
    "ocean": "the ocean",
}

# Words used to split unknown concatenated labels ("groundtrackfield" -> "ground track field").
_WORDS: frozenset[str] = frozenset(
    w for phrase in _SCENES.values() for w in phrase.split() if w not in {"a", "an", "the"}
) | frozenset(
    "area areas basketball circular cloud clouds container court courts crop crops dam field football glacier grass "
    "grassland ground harbour helicopter highway ice island lake land mine oil orchard palace panel panels pasture "
    "plane planes pool power quarry rail railway rectangular road roads rock roundabout sand sea ship ships snow "
    "soccer solar station swimming tank terrace thermal track train vegetation vehicle vehicles vineyard water "
    "wetland wind".split()
)

_AERIAL = frozenset(
    "aerial airborne aircraft airplane plane naip drone uav uas orthophoto orthophotos orthoimage orthoimagery "
    "orthophotography helicopter".split()
)
_SATELLITE_PREFIXES = (
    "satellite", "landsat", "sentinel", "worldview", "quickbird", "geoeye", "ikonos", "pleiades", "gaofen",
    "planetscope", "skysat", "rapideye", "kompsat", "superview", "jilin", "ziyuan", "cbers", "modis", "viirs",
    "copernicus", "spacenet", "terrasar",
)
_SATELLITE_WORDS = frozenset("spot gf zy oli msi etm tm aster dove hls planet".split())
_GENERIC_PLATFORMS = _AERIAL | {"satellite", "spacecraft", "camera"}

_THE_COUNTRIES = frozenset({
    "netherlands", "philippines", "bahamas", "gambia", "maldives", "comoros", "seychelles", "vatican",
    "gaza strip", "west bank", "czech republic", "dominican republic", "central african republic",
})
_THE_PREFIXES = ("united ", "republic ", "democratic ", "federated ", "people's ", "state of ")
_THE_SUFFIXES = (" islands", " republic", " kingdom", " emirates", " states")

_SEASONS_NORTH = ("winter", "winter", "spring", "spring", "spring", "summer",
                  "summer", "summer", "autumn", "autumn", "autumn", "winter")
_TROPIC_LAT = 23.5


def _text(value: Any) -> str | None:
    """A cleaned string field, or None when missing, empty or a null spelled as text."""
    if value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    text = re.sub(r"\s+", " ", str(value)).strip().rstrip(" ,;:.")
    return None if text.lower() in _MISSING_TEXT else text


def _number(value: Any) -> float | None:
    """A finite float field, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _article(phrase: str) -> str:
    """'a' or 'an' for a phrase, by its spoken first sound (numbers included: 'an 8 m', 'an 18 m', 'a 0.5 m')."""
    word = phrase.split(" ", 1)[0]
    digits = re.match(r"\d+", word)
    if digits:
        whole = digits.group().lstrip("0") or "0"
        lead = whole[: len(whole) % 3 or 3]  # the group spoken first: "18" of 18000, "8" of 8000
        return "an" if lead.startswith("8") or lead in {"11", "18"} else "a"
    lower = word.lower()
    if lower.startswith(("hour", "honest", "honor", "honour", "heir")):
        return "an"
    if lower.startswith(("uni", "use", "usu", "uti", "uro", "eu", "one", "once", "ubi")):
        return "a"
    return "an" if lower[:1] in set("aeiou") else "a"


def _with_article(phrase: str) -> str:
    """The phrase preceded by the right indefinite article."""
    return f"{_article(phrase)} {phrase}"


def _format_gsd(gsd_m: float) -> str:
    """GSD to 2 significant figures (whole metres kept from 10 m up), without a trailing '.0'."""
    if gsd_m >= 9.5:
        return str(math.floor(gsd_m + 0.5))
    value = Decimal(f"{gsd_m:.2g}").normalize()
    return format(value, "f")


def _kind(gsd_m: float) -> str:
    """Resolution class in words for a GSD in metres: very high, high, medium or low."""
    shown = float(_format_gsd(gsd_m))
    if shown < 1:
        return "very high"
    if shown < 5:
        return "high"
    if shown <= 30:
        return "medium"
    return "low"


def _valid_gsd(gsd_m: Any) -> float | None:
    """A usable positive GSD, or None."""
    gsd = _number(gsd_m)
    return gsd if gsd is not None and gsd > 0 else None


def _noun(gsd_m: float | None, sensor: str | None, platform: str | None) -> str | None:
    """'aerial' or 'satellite' from sensor/platform names, else from the GSD (< 1 m aerial); None if unknown."""
    tokens = re.findall(r"[a-z]+", f"{sensor or ''} {platform or ''}".lower())
    if any(t in _AERIAL for t in tokens):
        return "aerial"
    if any(t in _SATELLITE_WORDS or t.startswith(_SATELLITE_PREFIXES) for t in tokens):
        return "satellite"
    if "camera" in tokens:
        return "aerial"
    if gsd_m is None:
        return None
    return "aerial" if float(_format_gsd(gsd_m)) < 1 else "satellite"


def _image(gsd_m: float | None, noun: str | None) -> str:
    """'a 0.5 m aerial image', 'an 8 m satellite image', 'an aerial image' or 'a remote sensing image'."""
    body = f"{noun} image" if noun else "remote sensing image"
    if gsd_m is not None:
        body = f"{_format_gsd(gsd_m)} m {body}"
    return _with_article(body)


def gsd_words(gsd_m: float | None) -> str:
    """GSD in words, e.g. 'a 0.5 m aerial image at very high resolution'; no number when the GSD is unknown."""
    gsd = _valid_gsd(gsd_m)
    if gsd is None:
        return "a remote sensing image"
    return f"{_image(gsd, _noun(gsd, None, None))} at {_kind(gsd)} resolution"


def _split_label(label: str) -> list[str]:
    """Words of a snake_case, kebab-case, CamelCase or spaced label, lower-cased."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", label)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", spaced)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def _segment(token: str) -> list[str]:
    """Split a concatenated token into the fewest known words; the token itself when that is impossible."""
    best: list[list[str] | None] = [[]] + [None] * len(token)
    for end in range(1, len(token) + 1):
        for start in range(end):
            head = best[start]
            piece = token[start:end]
            if head is not None and piece in _WORDS:
                candidate = [*head, piece]
                current = best[end]
                if current is None or len(candidate) < len(current):
                    best[end] = candidate
    return best[-1] or [token]


def _scene(label: Any) -> str | None:
    """Noun phrase (with its article when countable) for a source dataset's scene class label."""
    text = _text(label)
    if text is None:
        return None
    compact = re.sub(r"[^a-z0-9]", "", text.lower())
    for candidate in (compact, compact + "s", compact.removesuffix("area"), compact.removesuffix("s")):
        if candidate in _SCENES:
            return _SCENES[candidate]
    words = [w for token in _split_label(text) for w in _segment(token)]
    if not words:
        return None
    phrase = " ".join(words)
    last = words[-1]
    if last.endswith("s") and not last.endswith(("ss", "us", "is")):
        return phrase
    return _with_article(f"{phrase} scene")


def _country(name: str) -> str:
    """Country name as used after 'in': 'the United States of America', 'the Netherlands', 'France'."""
    lower = name.lower()
    if lower.startswith("the "):
        return "the " + name[4:]
    if lower in _THE_COUNTRIES or lower.startswith(_THE_PREFIXES) or lower.endswith(_THE_SUFFIXES):
        return "the " + name
    return name


def _place(country: Any, continent: Any) -> str | None:
    """'in France, Europe', 'in Europe', 'over the open ocean', or None."""
    land = _text(country)
    region = _text(continent)
    ocean = region is not None and ("seven seas" in region.lower() or "open ocean" in region.lower())
    if ocean:
        return f"in {_country(land)}, in the open ocean" if land else "over the open ocean"
    if land and region and land.lower() != region.lower():
        return f"in {_country(land)}, {region}"
    if land or region:
        return f"in {_country(land) if land else region}"
    return None


def _year_month(acquired: Any) -> tuple[int | None, int | None]:
    """Year and month of an acquisition time (date, datetime or partial ISO 8601 string)."""
    if isinstance(acquired, dt.date):
        return acquired.year, acquired.month
    text = _text(acquired)
    if text is None:
        return None, None
    match = re.match(r"(\d{4})(?:-(\d{1,2}))?(?!\d)", text)
    if not match:
        return None, None
    month = int(match.group(2)) if match.group(2) else None
    return int(match.group(1)), month if month is not None and 1 <= month <= 12 else None


def _season(month: int | None, lat: float | None) -> str | None:
    """Astronomical-ish season of a month at a latitude; None in the tropics or when unknown."""
    if month is None or lat is None or abs(lat) > 90 or abs(lat) < _TROPIC_LAT:
        return None
    index = month - 1 if lat >= 0 else (month + 5) % 12
    return _SEASONS_NORTH[index]


def _when(acquired: Any, lat: Any) -> str | None:
    """'in the summer of 2019', 'in 2019', or None."""
    year, month = _year_month(acquired)
    season = _season(month, _number(lat))
    if year is None:
        return f"in {season}" if season else None
    return f"in the {season} of {year}" if season else f"in {year}"


def _sensor(sensor: Any, platform: Any) -> str | None:
    """Who captured the image: the sensor name, else a specific platform name; generic words get an article."""
    name = _text(sensor)
    if name is None:
        name = _text(platform)
        if name is None or name.lower() in _GENERIC_PLATFORMS:
            return None
        if name.islower():
            name = re.sub(r"(\d)([a-z])", lambda m: m.group(1) + m.group(2).upper(),
                          re.sub(r"(^|[\s-])([a-z])", lambda m: m.group(1) + m.group(2).upper(), name))
    if name.islower() and not re.search(r"\d", name):
        return _with_article(name)
    return name


@dataclass(frozen=True)
class _Parts:
    """The phrases a caption template arranges; any but `img` may be None."""

    img: str
    kind: str | None
    sensor: str | None
    scene: str | None
    place: str | None
    when: str | None

    @property
    def res(self) -> str | None:
        """'at very high resolution' or None."""
        return f"at {self.kind} resolution" if self.kind else None

    @property
    def by(self) -> str | None:
        """'by Landsat 8 OLI' or None."""
        return f"by {self.sensor}" if self.sensor else None

    @property
    def place_when(self) -> str | None:
        """Place and time together: 'in France, Europe, in the summer of 2019'."""
        if self.place and self.when:
            return f"{self.place}, {self.when}"
        return self.place or self.when


def _j(*pieces: str | None) -> str:
    """Join the present pieces with single spaces."""
    return " ".join(p for p in pieces if p)


def _t_showing(p: _Parts) -> list[str]:
    """'A 0.5 m aerial image at very high resolution showing X in P. It was captured by S in W.'."""
    where = p.place if p.scene else (f"taken {p.place}" if p.place else None)
    first = _j(p.img, p.res, f"showing {p.scene}" if p.scene else None, where)
    second = _j("It was captured", p.by, p.when) if (p.sensor or p.when) else ""
    return [first, second]


def _t_scene_first(p: _Parts) -> list[str]:
    """'X in P, seen in a 0.5 m aerial image at very high resolution. The image was taken by S in W.'."""
    if p.scene:
        first = _j(p.scene, p.place) + ", seen in " + _j(p.img, p.res)
    else:
        first = _j(p.img, p.res, f"taken {p.place}" if p.place else None)
    second = _j("The image was taken", p.by, p.when) if (p.sensor or p.when) else ""
    return [first, second]


def _t_overhead(p: _Parts) -> list[str]:
    """'Overhead view of X in P: a 0.5 m aerial image at very high resolution, captured by S in W.'."""
    head = _j("Overhead view", f"of {p.scene}" if p.scene else None, p.place)
    tail = ", " + _j("captured", p.by, p.when) if (p.sensor or p.when) else ""
    return [f"{head}: {_j(p.img, p.res)}{tail}"]


def _t_sensor_first(p: _Parts) -> list[str]:
    """'S captured a 30 m satellite image of X in P, in W. The resolution is medium.'."""
    body = _j(p.img, f"of {p.scene}" if p.scene else None, p.place_when)
    first = _j(p.sensor, "captured", body) if p.sensor else body
    second = f"The resolution is {p.kind}" if p.kind else ""
    return [first, second]


def _t_this_is(p: _Parts) -> list[str]:
    """'This is a 0.5 m aerial image of X in P. It was captured by S in W at very high resolution.'."""
    first = _j("This is", p.img, f"of {p.scene}" if p.scene else None, p.place)
    second = _j("It was captured", p.by, p.when, p.res) if (p.sensor or p.when or p.kind) else ""
    return [first, second]


def _t_from_above(p: _Parts) -> list[str]:
    """'X as seen from above in P, in W. The picture is a 0.5 m aerial image at very high resolution, ...'."""
    first = _j(p.scene, "as seen from above", p.place_when) if p.scene else _j("A view from above", p.place_when)
    second = _j("The picture is", p.img, p.res)
    if p.sensor:
        second += f", captured by {p.sensor}"
    return [first, second]


_TEMPLATES: tuple[Callable[[_Parts], list[str]], ...] = (
    _t_showing, _t_scene_first, _t_overhead, _t_sensor_first, _t_this_is, _t_from_above,
)


def _template_index(key: str) -> int:
    """Template chosen by SHA-256 of the key: the same in every process, spread evenly over keys."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % len(_TEMPLATES)


def _sentence(text: str) -> str:
    """Tidy one sentence: single spaces, no stray commas, capital first letter, final period."""
    text = re.sub(r"\(\s*\)", "", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.:;])", r"\1", text)
    text = re.sub(r",(\s*,)+", ",", text)
    text = text.strip(" ,;:")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def template_caption(row: Mapping[str, Any]) -> str:
    """A deterministic English caption for a metadata row; the phrasing is chosen from the row's key."""
    gsd = _valid_gsd(row.get("gsd_m"))
    sensor = _text(row.get("sensor"))
    platform = _text(row.get("platform"))
    parts = _Parts(
        img=_image(gsd, _noun(gsd, sensor, platform)),
        kind=_kind(gsd) if gsd is not None else None,
        sensor=_sensor(sensor, platform),
        scene=_scene(row.get("scene_class")),
        place=_place(row.get("country"), row.get("continent")),
        when=_when(row.get("acquired"), row.get("lat")),
    )
    template = _TEMPLATES[_template_index(str(row.get("key") or ""))]
    sentences = [_sentence(s) for s in template(parts)]
    return " ".join(s for s in sentences if s)

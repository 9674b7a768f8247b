"""Procedural visual documents: report pages and slides with text, tables and bar charts about made-up companies.

Every company has a unique made-up name within a generated set and three pages (profile text, revenue table,
product bar chart). Every question names the company and asks for a fact printed on exactly one of its pages, so
the page that answers it is known (the qrel) and unique.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

_SYLLABLES = ("zor", "bex", "qua", "lith", "mer", "ton", "vel", "ora", "nix", "dra", "pol", "kin", "sar", "vo",
              "tra", "lum", "gen", "ax", "rei", "fol", "cor", "dan", "wen", "is", "bal", "tek", "ru", "mos")
CITIES = ("Avalon", "Brindle", "Corvale", "Dunmore", "Elstree", "Fairhaven", "Glenrock", "Harwick", "Ironbay",
          "Jasper Falls", "Kestrel", "Lindqvist", "Marrow", "Northgate", "Oakridge", "Pelham")
PEOPLE = ("Ada Ramsey", "Boris Keller", "Chen Wei", "Dana Okafor", "Elena Ruiz", "Farid Nasser", "Greta Lind",
          "Hugo Marchetti", "Ines Duarte", "Jonas Berg", "Keiko Tanaka", "Liam O'Brien", "Mira Patel", "Nils Strand")
SECTORS = ("logistics", "software", "textiles", "solar energy", "food processing", "robotics", "shipping", "pharmacy")
REGIONS = ("North", "South", "East", "West")
YEARS = ("2021", "2022", "2023")
PRODUCTS = ("lamps", "kettles", "bicycles", "drones", "chairs", "sensors", "helmets", "tents", "pumps", "scooters")
_FILLER = ("the board reviewed the annual plan and approved new investments in staff training and equipment",
           "customer satisfaction remained stable while delivery times improved across most sites",
           "the company continued to reduce energy use per unit produced",
           "a new partnership programme was launched with regional suppliers",
           "maintenance costs rose slightly because of older machinery",
           "the audit committee met four times during the year",
           "management expects moderate growth in the coming period",
           "several internal processes were digitised to save paperwork")
BAR_COLORS = ((66, 110, 200), (220, 120, 50), (80, 160, 90), (170, 80, 160), (200, 60, 70), (90, 170, 190))
PAGE_TYPES = ("profile", "table", "chart")


@dataclass
class Company:
    """Facts about one made-up company; each fact is printed on exactly one of its pages."""

    name: str
    city: str
    founded: int
    ceo: str
    employees: int
    sector: str
    revenue: dict[str, dict[str, int]] = field(default_factory=dict)  # region -> year -> value
    units: dict[str, int] = field(default_factory=dict)  # product -> units sold


@dataclass
class Question:
    """A question about one page, its answer, and the page's type."""

    text: str
    answer: str
    page_type: str
    kind: str  # which fact: city, founded, ceo, employees, revenue, top_product, units


def make_name(rng: random.Random, taken: set[str]) -> str:
    """A new pronounceable company name not in ``taken`` (and added to it)."""
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken and len(name) >= 5:
            taken.add(name)
            return name


def make_company(rng: random.Random, taken: set[str]) -> Company:
    company = Company(
        name=make_name(rng, taken),
        city=rng.choice(CITIES),
        founded=rng.randint(1950, 2015),
        ceo=rng.choice(PEOPLE),
        employees=rng.randrange(40, 9000, 10),
        sector=rng.choice(SECTORS),
    )
    company.revenue = {r: {y: rng.randint(10, 990) for y in YEARS} for r in REGIONS}
    products = rng.sample(PRODUCTS, rng.randint(4, 5))
    values = rng.sample(range(100, 2000, 10), len(products))  # distinct, so "the most" is well defined
    company.units = dict(zip(products, values))
    return company


def questions(company: Company) -> list[Question]:
    """All questions answerable from the company's pages (each from exactly one page)."""
    c = company
    qs = [
        Question(f"In which city was {c.name} founded?", c.city, "profile", "city"),
        Question(f"In what year was {c.name} founded?", str(c.founded), "profile", "founded"),
        Question(f"Who is the chief executive of {c.name}?", c.ceo, "profile", "ceo"),
        Question(f"How many people does {c.name} employ?", str(c.employees), "profile", "employees"),
    ]
    for region, row in c.revenue.items():
        for year, value in row.items():
            qs.append(
                Question(f"What was the revenue of {c.name} in the {region} region in {year}?", str(value), "table",
                         "revenue")
            )
    top = max(c.units, key=c.units.__getitem__)
    qs.append(Question(f"Which product of {c.name} sold the most units?", top, "chart", "top_product"))
    for product, n in c.units.items():
        qs.append(Question(f"How many {product} did {c.name} sell?", str(n), "chart", "units"))
    return qs


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font, with the basic layout engine: fast, and the same glyphs on every machine
    font = ImageFont.load_default(size=size)
    if isinstance(font, ImageFont.FreeTypeFont):
        return font.font_variant(layout_engine=ImageFont.Layout.BASIC)
    return font


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def _paragraphs(draw: ImageDraw.ImageDraw, paras: list[str], x: int, y: int, width: int, size: int) -> int:
    font = _font(size)
    for para in paras:
        for line in _wrap(draw, para, font, width):
            draw.text((x, y), line, fill=(25, 25, 25), font=font)
            y += int(size * 1.35)
        y += size
    return y


def _table(draw: ImageDraw.ImageDraw, c: Company, x: int, y: int, width: int, size: int) -> int:
    font, bold = _font(size), _font(size + 1)
    cols = ["Region", *YEARS]
    cw, rh = width // len(cols), int(size * 2.0)
    draw.rectangle((x, y, x + cw * len(cols), y + rh), fill=(225, 230, 240))
    for j, name in enumerate(cols):
        draw.text((x + j * cw + 8, y + rh // 4), name, fill=(0, 0, 0), font=bold)
    for i, (region, row) in enumerate(c.revenue.items(), start=1):
        yy = y + i * rh
        for j, value in enumerate([region, *(str(row[yr]) for yr in YEARS)]):
            draw.text((x + j * cw + 8, yy + rh // 4), value, fill=(20, 20, 20), font=font)
    for i in range(len(c.revenue) + 2):
        draw.line((x, y + i * rh, x + cw * len(cols), y + i * rh), fill=(120, 120, 120), width=1)
    for j in range(len(cols) + 1):
        draw.line((x + j * cw, y, x + j * cw, y + rh * (len(c.revenue) + 1)), fill=(120, 120, 120), width=1)
    return y + rh * (len(c.revenue) + 1) + size


def _bar_chart(draw: ImageDraw.ImageDraw, c: Company, box: tuple[int, int, int, int], size: int) -> None:
    x0, y0, x1, y1 = box
    font = _font(size)
    base = y1 - 2 * size
    draw.line((x0, base, x1, base), fill=(0, 0, 0), width=2)
    draw.line((x0, y0, x0, base), fill=(0, 0, 0), width=2)
    top = max(c.units.values())
    slot = (x1 - x0) // len(c.units)
    for k, (product, n) in enumerate(c.units.items()):
        h = int((base - y0 - 2 * size) * n / top)
        bx = x0 + k * slot + slot // 5
        draw.rectangle((bx, base - h, bx + slot * 3 // 5, base), fill=BAR_COLORS[k % len(BAR_COLORS)])
        draw.text((bx, base - h - int(size * 1.3)), str(n), fill=(0, 0, 0), font=font)
        draw.text((bx, base + size // 3), product, fill=(0, 0, 0), font=font)


def render_page(
    company: Company, page_type: str, style: str = "report", size: tuple[int, int] | None = None
) -> Image.Image:
    """Render one page.

    Args:
        company: Whose facts to print.
        page_type: ``"profile"`` (paragraphs), ``"table"`` (revenue table) or ``"chart"`` (units bar chart).
        style: ``"report"`` (portrait page, black title) or ``"slide"`` (landscape, coloured header bar).
        size: (width, height); defaults to 672x864 for reports and 864x648 for slides, both large enough that
            InternVL-style dynamic tiling cuts them into several tiles.
    """
    slide = style == "slide"
    w, h = size or ((864, 648) if slide else (672, 864))
    page = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    margin = w // 14
    titles = {
        "profile": "Company profile",
        "table": "Regional revenue (thousand credits)",
        "chart": "Units sold by product",
    }
    if slide:
        draw.rectangle((0, 0, w, h // 7), fill=(30, 60, 110))
        draw.text((margin, h // 28), f"{company.name}: {titles[page_type]}", fill=(255, 255, 255), font=_font(30))
        y = h // 7 + 24
    else:
        draw.text((margin, margin), company.name, fill=(10, 10, 10), font=_font(40))
        draw.text((margin, margin + 52), titles[page_type], fill=(70, 70, 70), font=_font(22))
        draw.line((margin, margin + 86, w - margin, margin + 86), fill=(60, 60, 60), width=2)
        y = margin + 104
    body = 22 if slide else 17
    c = company
    if page_type == "profile":
        facts = (f"{c.name} is a {c.sector} company founded in {c.founded} in {c.city}. It is led by its chief "
                 f"executive {c.ceo} and employs {c.employees} people.")
        filler = [f"During the year {' and '.join(random.Random(c.name).sample(_FILLER, 2))}.",
                  f"In addition, {random.Random(c.name + '/2').choice(_FILLER)}."]
        paras = [f"- Founded in {c.founded} in {c.city}", f"- Chief executive: {c.ceo}", f"- Employees: {c.employees}"]
        _paragraphs(draw, paras if slide else [facts, *filler], margin, y, w - 2 * margin, body)
    elif page_type == "table":
        y = _table(draw, c, margin, y, w - 2 * margin, body)
        if not slide:
            _paragraphs(draw, [f"Revenue of {c.name} by region for {YEARS[0]}-{YEARS[-1]}."], margin, y, w - 2 * margin,
                        body)
    elif page_type == "chart":
        _bar_chart(draw, c, (margin, y + 10, w - margin, h - margin), body)
    else:
        raise ValueError(f"unknown page type {page_type!r}; use one of {PAGE_TYPES}")
    return page

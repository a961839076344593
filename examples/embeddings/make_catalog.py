#!/usr/bin/env python3
"""Writes catalog.tsv: 300 short product descriptions, `sku-NNNN<TAB>text` a line.

Deterministic (no randomness), so the committed file can be checked against this script.
Twelve departments of five products; each product comes five times, with a different
quality and a purpose that suits it, so "more like this" has close neighbours to find, and
shared words across departments ("waterproof" boots, jackets and tents) keep the ranking
from being mere keyword overlap.
"""
from __future__ import annotations

import sys
from pathlib import Path

ITEMS_PER_DEPARTMENT = 25

# department: (qualities that suit each of its products, {product: purposes that suit it})
DEPARTMENTS = {
    "footwear": (
        ["waterproof", "lightweight", "cushioned", "wide-fit", "vegan"],
        {"hiking boots": ["for muddy mountain trails", "for long treks", "for rocky ground"],
         "trail running shoes": ["for forest trails", "for ultramarathons", "for wet autumn runs"],
         "leather loafers": ["for the office", "for weddings", "for summer evenings"],
         "canvas sneakers": ["for long city walks", "for weekends", "for festivals"],
         "rain boots": ["for wet autumn days", "for farm work", "for puddle-jumping kids"]},
    ),
    "outerwear": (
        ["waterproof", "packable", "windproof", "recycled", "hooded"],
        {"rain jacket": ["for commuting by bike", "for coastal walks", "for festivals"],
         "down parka": ["for cold winter mornings", "for arctic trips", "for ski holidays"],
         "fleece pullover": ["for layering", "for chilly campfires", "for autumn hikes"],
         "softshell vest": ["for alpine hikes", "for trail running", "for cool spring days"],
         "wool overcoat": ["for the office", "for city winters", "for formal evenings"]},
    ),
    "kitchen": (
        ["dishwasher-safe", "heavy-duty", "hand-finished", "professional-grade", "space-saving"],
        {"chef's knife": ["for slicing vegetables", "for carving roasts", "for sushi"],
         "cast iron skillet": ["for searing steaks", "for cornbread", "for campfire cooking"],
         "stainless steel saucepan": ["for sauces", "for boiling pasta", "for everyday cooking"],
         "bamboo cutting board": ["for meal prep", "for serving cheese", "for small kitchens"],
         "ceramic mixing bowls": ["for baking bread", "for salads", "for cake batter"]},
    ),
    "coffee": (
        ["compact", "barista-grade", "stainless steel", "easy-clean", "travel-sized"],
        {"burr coffee grinder": ["for single-origin beans", "for espresso",
                                 "for french press coffee"],
         "pour-over dripper": ["for a slow morning cup", "for camping trips", "for light roasts"],
         "espresso machine": ["for a morning flat white", "for the office kitchen",
                              "for cappuccinos"],
         "french press": ["for cold brew", "for a big breakfast", "for tea lovers"],
         "milk frother": ["for latte art", "for hot chocolate", "for oat milk"]},
    ),
    "audio": (
        ["portable", "high-fidelity", "compact", "premium", "beginner-friendly"],
        {"noise-cancelling headphones": ["for long flights", "for open-plan offices", "for focus"],
         "bluetooth speaker": ["for beach parties", "for the shower", "for picnics"],
         "studio microphone": ["for podcast recording", "for streaming", "for voice-overs"],
         "turntable": ["for vinyl collectors", "for the living room", "for jazz records"],
         "wireless earbuds": ["for the gym", "for running", "for phone calls"]},
    ),
    "computing": (
        ["slim", "adjustable", "compact", "aluminium", "high-performance"],
        {"mechanical keyboard": ["for programmers", "for gaming", "for writers"],
         "ergonomic mouse": ["for wrist pain", "for a home office", "for designers"],
         "4K monitor": ["for video editing", "for photo retouching", "for spreadsheets"],
         "USB-C docking station": ["for laptops", "for a dual-monitor desk", "for hot-desking"],
         "laptop stand": ["for video calls", "for better posture", "for travel"]},
    ),
    "garden": (
        ["rust-proof", "heavy-duty", "ergonomic", "UV-resistant", "lightweight"],
        {"pruning shears": ["for rose bushes", "for fruit trees", "for hedges"],
         "garden hose": ["for vegetable patches", "for washing the car", "for summer lawns"],
         "raised planter bed": ["for herb gardens", "for balcony gardens", "for strawberries"],
         "compost bin": ["for kitchen scraps", "for allotments", "for leaf mould"],
         "watering can": ["for tomato plants", "for houseplants", "for seedlings"]},
    ),
    "camping": (
        ["ultralight", "compact", "rugged", "waterproof", "budget"],
        {"two-person tent": ["for backpacking trips", "for festival weekends", "for windy beaches"],
         "sleeping bag": ["for winter camping", "for summer nights", "for sleepovers"],
         "camping stove": ["for canoe trips", "for car camping", "for mountain huts"],
         "headlamp": ["for night hikes", "for caving", "for power cuts"],
         "water filter": ["for emergencies", "for long-distance hikes", "for travel abroad"]},
    ),
    "fitness": (
        ["non-slip", "space-saving", "durable", "eco-friendly", "travel-sized"],
        {"yoga mat": ["for hot yoga", "for pilates", "for morning stretches"],
         "adjustable dumbbells": ["for strength training", "for home workouts", "for small flats"],
         "resistance bands": ["for physiotherapy", "for glute workouts", "for hotel rooms"],
         "foam roller": ["for sore muscles", "for runners", "for warm-ups"],
         "jump rope": ["for boxing training", "for cardio", "for playground games"]},
    ),
    "toys": (
        ["colourful", "educational", "classic", "award-winning", "giant"],
        {"wooden building blocks": ["for toddlers", "for creative play", "for kindergartens"],
         "jigsaw puzzle": ["for rainy afternoons", "for grandparents", "for puzzle fans"],
         "remote control car": ["for curious ten-year-olds", "for racing in the park",
                                "for birthdays"],
         "plush bear": ["for bedtime", "for newborns", "for Valentine's Day"],
         "board game": ["for game night", "for family holidays", "for two players"]},
    ),
    "books": (
        ["illustrated", "hardcover", "pocket-sized", "paperback", "gift-edition"],
        {"cookbook": ["for home cooks", "for vegetarian dinners", "for baking beginners"],
         "field guide to birds": ["for birdwatchers", "for nature walks", "for young naturalists"],
         "science fiction novel": ["for long train rides", "for the beach", "for book clubs"],
         "travel guide": ["for a trip to Japan", "for a road trip across Italy", "for backpackers"],
         "sketchbook": ["for young artists", "for urban sketching", "for watercolours"]},
    ),
    "home": (
        ["handmade", "minimalist", "cosy", "Scandinavian-style", "eco-friendly"],
        {"linen bed sheets": ["for better sleep", "for hot summers", "for guest rooms"],
         "blackout curtains": ["for night-shift workers", "for nurseries", "for bedrooms"],
         "table lamp": ["for a reading nook", "for a bedside table", "for a home office"],
         "wool throw blanket": ["for chilly evenings", "for the sofa", "for movie nights"],
         "scented candle": ["for a relaxing bath", "for the living room", "for gifts"]},
    ),
}


def catalog_lines() -> list[str]:
    lines = []
    for qualities, products in DEPARTMENTS.values():
        names = list(products)
        for k in range(ITEMS_PER_DEPARTMENT):
            # k -> each product five times, with each quality once and its purposes in turn.
            product = names[k % 5]
            quality = qualities[(k // 5 + k) % 5]
            purpose = products[product][(k // 5) % 3]
            lines.append(f"{quality} {product} {purpose}")
    return [f"sku-{i:04d}\t{text}" for i, text in enumerate(lines, start=1)]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("catalog.tsv")
    out.write_text("\n".join(catalog_lines()) + "\n")


if __name__ == "__main__":
    main()

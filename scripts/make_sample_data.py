#!/usr/bin/env python3
"""Draw the sample products in sample-data/ (transparent PNGs, our own licence) and write
sample-data/products.jsonl. Needs only Pillow and numpy:

    python3 scripts/make_sample_data.py

Every product is drawn from shapes with shading (a vertical light gradient, a highlight and a
soft anti-aliased alpha edge) so that edges, Canny maps and masks behave like real cut-outs.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sample-data"
SS = 4  # supersampling factor for anti-aliased edges


def canvas(w, h):
    return Image.new("L", (w * SS, h * SS), 0)


def finish(mask, w, h, base_rgb, shade=0.35, highlight=(0.3, 0.25), texture=0.0, seed=0):
    """Turn a supersampled mask into an RGBA product with shading."""
    mask = mask.resize((w, h), Image.LANCZOS)
    a = np.asarray(mask).astype(np.float32) / 255.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # horizontal cylinder-like shading + vertical falloff
    cols = np.where(a.max(axis=0) > 0.5)[0]
    x0, x1 = (cols.min(), cols.max()) if len(cols) else (0, w - 1)
    u = np.clip((xx - x0) / max(1, x1 - x0), 0, 1)
    light = 1.0 - shade * (np.abs(u - highlight[0]) ** 1.2) - 0.15 * (yy / h)
    hx = highlight[0] * (x1 - x0) + x0
    spec = np.exp(-((xx - hx) ** 2) / (2 * (0.04 * w) ** 2)) * highlight[1]
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, texture, (h, w)).astype(np.float32) if texture > 0 else 0.0
    rgb = np.stack([np.clip(c / 255.0 * light + spec + noise, 0, 1) for c in base_rgb], -1)
    out = np.dstack([rgb * 255.0, a * 255.0]).round().astype(np.uint8)
    return Image.fromarray(out, "RGBA")


def overlay(base, top):
    return Image.alpha_composite(base, top)


def part(w, h, draw_fn, rgb, **kw):
    m = canvas(w, h)
    draw_fn(ImageDraw.Draw(m), SS)
    return finish(m, w, h, rgb, **kw)


def bottle():
    w, h = 220, 620
    def body(d, s):
        d.rounded_rectangle([20 * s, 200 * s, 200 * s, 600 * s], radius=40 * s, fill=255)
        d.ellipse([20 * s, 140 * s, 200 * s, 280 * s], fill=255)
        d.rectangle([75 * s, 60 * s, 145 * s, 200 * s], fill=255)
    def cap(d, s):
        d.rounded_rectangle([68 * s, 10 * s, 152 * s, 80 * s], radius=8 * s, fill=255)
    def label(d, s):
        d.rectangle([20 * s, 330 * s, 200 * s, 470 * s], fill=255)
    img = part(w, h, body, (60, 140, 90), texture=0.01)
    img = overlay(img, part(w, h, cap, (200, 170, 60)))
    img = overlay(img, part(w, h, label, (235, 230, 215), shade=0.25))
    return img


def chair():
    w, h = 460, 560
    def seat(d, s):
        d.polygon([(60 * s, 300 * s), (400 * s, 300 * s), (430 * s, 350 * s), (30 * s, 350 * s)], fill=255)
        d.rounded_rectangle([70 * s, 40 * s, 390 * s, 300 * s], radius=30 * s, fill=255)
    def legs(d, s):
        for x in (45, 395):
            d.rectangle([x * s, 350 * s, (x + 22) * s, 550 * s], fill=255)
        for x in (110, 330):
            d.rectangle([x * s, 350 * s, (x + 16) * s, 500 * s], fill=255)
    img = part(w, h, legs, (90, 60, 35))
    img = overlay(img, part(w, h, seat, (170, 60, 50), texture=0.03))
    return img


def shoe():
    w, h = 600, 300
    def upper(d, s):
        d.polygon([(40 * s, 230 * s), (60 * s, 120 * s), (180 * s, 60 * s), (300 * s, 90 * s),
                   (420 * s, 150 * s), (560 * s, 190 * s), (575 * s, 240 * s)], fill=255)
    def sole(d, s):
        d.rounded_rectangle([30 * s, 225 * s, 585 * s, 280 * s], radius=22 * s, fill=255)
    def laces(d, s):
        for i in range(5):
            x = 230 + i * 35
            d.line([(x * s, (100 + i * 12) * s), ((x + 30) * s, (125 + i * 12) * s)], fill=255, width=8 * s)
    img = part(w, h, upper, (40, 80, 170), texture=0.02)
    img = overlay(img, part(w, h, sole, (240, 240, 235), shade=0.2))
    img = overlay(img, part(w, h, laces, (250, 250, 250), shade=0.1))
    return img


def phone():
    w, h = 300, 600
    def body(d, s):
        d.rounded_rectangle([10 * s, 10 * s, 290 * s, 590 * s], radius=45 * s, fill=255)
    def screen(d, s):
        d.rounded_rectangle([28 * s, 40 * s, 272 * s, 560 * s], radius=30 * s, fill=255)
    img = part(w, h, body, (190, 190, 200), shade=0.3)
    img = overlay(img, part(w, h, screen, (25, 35, 70), shade=0.5, highlight=(0.2, 0.35)))
    return img


def jar():
    w, h = 420, 360
    def body(d, s):
        d.rounded_rectangle([20 * s, 120 * s, 400 * s, 350 * s], radius=50 * s, fill=255)
    def lid(d, s):
        d.rounded_rectangle([35 * s, 20 * s, 385 * s, 135 * s], radius=20 * s, fill=255)
    img = part(w, h, body, (245, 215, 220), shade=0.3)
    img = overlay(img, part(w, h, lid, (200, 165, 90), shade=0.45, highlight=(0.35, 0.4)))
    return img


def lamp():
    w, h = 380, 640
    def shade_(d, s):
        d.polygon([(110 * s, 20 * s), (270 * s, 20 * s), (360 * s, 230 * s), (20 * s, 230 * s)], fill=255)
    def stem(d, s):
        d.rectangle([178 * s, 230 * s, 202 * s, 590 * s], fill=255)
        d.ellipse([90 * s, 570 * s, 290 * s, 630 * s], fill=255)
    img = part(w, h, stem, (60, 60, 65), shade=0.4)
    img = overlay(img, part(w, h, shade_, (240, 225, 180), shade=0.3, texture=0.015))
    return img


def bag():
    w, h = 500, 520
    def handle(d, s):
        d.arc([120 * s, 10 * s, 380 * s, 260 * s], 180, 360, fill=255, width=26 * s)
    def body(d, s):
        d.polygon([(70 * s, 170 * s), (430 * s, 170 * s), (480 * s, 500 * s), (20 * s, 500 * s)], fill=255)
    def clasp(d, s):
        d.rounded_rectangle([220 * s, 200 * s, 280 * s, 250 * s], radius=8 * s, fill=255)
    img = part(w, h, handle, (120, 70, 40))
    img = overlay(img, part(w, h, body, (150, 85, 45), texture=0.03))
    img = overlay(img, part(w, h, clasp, (215, 185, 90), highlight=(0.4, 0.4)))
    return img


def kettle():
    w, h = 560, 520
    def body(d, s):
        d.ellipse([90 * s, 110 * s, 450 * s, 500 * s], fill=255)
        d.rectangle([120 * s, 300 * s, 420 * s, 500 * s], fill=255)
    def spout(d, s):
        d.polygon([(420 * s, 300 * s), (545 * s, 170 * s), (555 * s, 190 * s), (440 * s, 380 * s)], fill=255)
    def handle(d, s):
        d.arc([20 * s, 160 * s, 200 * s, 420 * s], 90, 270, fill=255, width=28 * s)
    def lid(d, s):
        d.ellipse([200 * s, 80 * s, 340 * s, 140 * s], fill=255)
        d.ellipse([250 * s, 50 * s, 290 * s, 95 * s], fill=255)
    img = part(w, h, handle, (30, 30, 30))
    img = overlay(img, part(w, h, spout, (185, 190, 195), shade=0.4))
    img = overlay(img, part(w, h, body, (190, 195, 200), shade=0.5, highlight=(0.3, 0.45)))
    img = overlay(img, part(w, h, lid, (30, 30, 30)))
    return img


PRODUCTS = [
    ("bottle", bottle, "绿色玻璃橄榄油瓶 500ml", "Green glass olive-oil bottle, 500 ml",
     "a bottle on a marble kitchen counter, soft morning light, herbs in the background, high quality product photo"),
    ("chair", chair, "北欧风红色布艺餐椅", "Nordic red fabric dining chair",
     "a chair in a bright scandinavian living room, wooden floor, plants, natural light, interior photography"),
    ("shoe", shoe, "男款蓝色透气跑步鞋", "Men's blue breathable running shoe",
     "a running shoe on a wet asphalt road at sunrise, dynamic, sharp focus, advertising photo"),
    ("phone", phone, "6.7英寸全面屏智能手机", "6.7-inch full-screen smartphone",
     "a smartphone standing on a clean white desk, minimal studio, soft shadows, tech advertisement"),
    ("jar", jar, "玫瑰精华保湿面霜 50g", "Rose essence moisturising cream, 50 g",
     "a cosmetics jar on a pink silk cloth with rose petals, soft pastel light, beauty product photography"),
    ("lamp", lamp, "简约亚麻灯罩落地灯", "Minimalist linen-shade floor lamp",
     "a floor lamp beside a cozy sofa in a warm evening living room, interior design photo"),
    ("bag", bag, "复古真皮手提包", "Vintage genuine-leather handbag",
     "a leather handbag on a wooden table in a sunny cafe, bokeh, fashion advertising"),
    ("kettle", kettle, "不锈钢电热水壶 1.7L", "Stainless-steel electric kettle, 1.7 L",
     "a kettle on a modern kitchen countertop, tiles, morning light, home appliance advertisement"),
]

NEGATIVE = "lowres, blurry, deformed, watermark, text, extra objects, bad composition, oversaturated"


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, fn, zh, en, prompt) in enumerate(PRODUCTS):
        img = fn()
        # a soft 1-px feather like a real matting result
        a = img.getchannel("A").filter(ImageFilter.GaussianBlur(0.6))
        img.putalpha(a)
        path = OUT / f"{name}.png"
        img.save(path, optimize=True)
        lines.append({
            "id": name,
            "image": f"{name}.png",
            "title_zh": zh,
            "title_en": en,
            "prompt": prompt,
            "negative_prompt": NEGATIVE,
        })
        print(f"wrote {path.relative_to(ROOT)} {img.size}")
    with open(OUT / "products.jsonl", "w", encoding="utf-8") as f:
        for l in lines:
            f.write(json.dumps(l, ensure_ascii=False) + "\n")
    print(f"wrote sample-data/products.jsonl ({len(lines)} products)")


if __name__ == "__main__":
    main()

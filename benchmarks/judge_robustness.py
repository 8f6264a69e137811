"""How the shapes judge's shape test copes with imperfect drawing, on images whose true shape is
known: ground-truth renders of one object with patch-sized bites and bumps along its edges
(:func:`diffmoe.data.shapes.add_edge_defects`), judged by the template test the judge uses and,
side by side, by the bounding-box fill test it replaced (square if the object fills at least
0.88 of its box, circle from 0.66, triangle below).

    python benchmarks/judge_robustness.py [--per-shape 100] [--counts 0 1 2 3 4 6] [--depths 1 2]

Prints, for each defect depth and count, the fraction of each shape read as itself and the
fraction of circles and triangles read as squares.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

from diffmoe.data.shapes import COLOURS, SHAPES, Group, Scene, add_edge_defects, render
from diffmoe.t2i.judge import NO_OBJECT, Detection, detect, largest_shape

# The fill test of diffmoe's judge before the template test, kept here as the baseline.
FILL_SQUARE, FILL_CIRCLE = 0.88, 0.66


def by_fill(found: list[Detection]) -> str:
    if not found:
        return NO_OBJECT
    fill = max(found, key=lambda d: d.area).fill
    return "square" if fill >= FILL_SQUARE else "circle" if fill >= FILL_CIRCLE else "triangle"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-shape", type=int, default=100)
    p.add_argument("--counts", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6])
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    tests = {"template": largest_shape, "fill": by_fill}
    columns = ["depth", "defects"] + [f"{t}: {c}" for t in tests
                                       for c in (*SHAPES, "others as square")]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for depth in args.depths:
        for count in args.counts:
            rng = random.Random(1000 * depth + count)
            confusion = {t: {s: Counter() for s in SHAPES} for t in tests}
            for i in range(args.per_shape * len(SHAPES)):
                shape = SHAPES[i % len(SHAPES)]
                clean = render(Scene((Group(1, rng.choice(list(COLOURS)), shape),)), i)
                found = detect(add_edge_defects(clean, count, depth, rng))
                for name, test in tests.items():
                    confusion[name][shape][test(found)] += 1
            cells = []
            for name in tests:
                cells += [f"{confusion[name][s][s] / args.per_shape:.2f}" for s in SHAPES]
                others = [s for s in SHAPES if s != "square"]
                as_square = sum(confusion[name][s]["square"] for s in others)
                cells.append(f"{as_square / (args.per_shape * len(others)):.2f}")
            print(f"| {depth} | {count} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

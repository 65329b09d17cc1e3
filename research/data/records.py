"""The one record type every loader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Review:
    """One user's review of one item, as read from any source.

    ``text`` is the review body (for PEPLER pickles, which keep no body, the template sentence).
    ``sentence`` is PEPLER's explanation sentence when the source has one (else ``""``);
    ``features`` are aspect words the review talks about (PEPLER: the template's feature);
    ``summary`` is a review title (Amazon); ``timestamp`` is seconds since the epoch, or None.
    """

    user: str
    item: str
    rating: float | None
    text: str
    features: tuple[str, ...] = ()
    timestamp: int | None = None
    summary: str = ""
    sentence: str = ""

"""A controllable synthetic review corpus: the text follows from the user and the item by rules.

Everything is drawn from one ``numpy`` generator seeded with ``seed``, so the corpus is a pure
function of its arguments. The rules:

* Aspects are the first ``num_aspects`` of ``ASPECTS`` ("sound", "price", "size", ...).
* Every user has two distinct preferred aspects in a fixed order ``(a1, a2)`` and a voice,
  plain or strong. Every item has a quality in {-1, 0, +1} on every aspect.
* Reviewed pairs (user, item) are distinct and drawn uniformly without replacement.
* A review by user ``u`` of item ``i`` reads
  ``"the {a1} is {adj(q1)} {conn} the {a2} is {adj(q2)}."`` where ``q1, q2`` are the item's
  qualities on the user's aspects, ``adj`` comes from the user's voice
  (plain: bad/okay/good, strong: awful/fine/great for -1/0/+1) and ``conn`` is "but" when one
  quality is +1 and the other -1, else "and".
* rating = 3 + q1 + q2 (1..5); summary = ``SUMMARIES[rating]``; features = (a1, a2);
  sentence = text (one sentence); timestamps are distinct days, in random order.

Consequences used by tests and the demo: the text is determined by (user, item) and by nothing
else, so a decoder that ignores its conditioning cannot fit it. A user's other reviews show
their aspects and voice; an item's other reviews show its quality on the aspects its other
reviewers care about (all of them, once the item has a few reviewers), so ``user_item_history``
carries what the target needs. ``features`` names the aspects but not the qualities.
GPT-2 BPE turns a review into 10-11 tokens.
"""

from __future__ import annotations

import numpy as np

from research.data.records import Review

ASPECTS = ("sound", "price", "size", "weight", "color", "case")
VOICES = (("bad", "okay", "good"), ("awful", "fine", "great"))
SUMMARIES = {1: "very bad", 2: "not good", 3: "just okay", 4: "pretty good", 5: "really great"}
# 2011-03-13: timestamps look like real review times.
_FIRST_DAY = 1_300_000_000
_DAY = 86_400


def review_text(aspects: tuple[str, str], voice: int, qualities: tuple[int, int]) -> str:
    """The review sentence for a user's ``aspects``/``voice`` and the item's ``qualities``."""
    words = VOICES[voice]
    connective = "but" if sorted(qualities) == [-1, 1] else "and"
    (a1, a2), (q1, q2) = aspects, qualities
    return f"the {a1} is {words[q1 + 1]} {connective} the {a2} is {words[q2 + 1]}."


def synthetic_reviews(
    num_users: int, num_items: int, num_reviews: int, seed: int, num_aspects: int
) -> list[Review]:
    """``num_reviews`` reviews of distinct (user, item) pairs following the module's rules."""
    if not 2 <= num_aspects <= len(ASPECTS):
        raise ValueError(f"data.synthetic.num_aspects={num_aspects} must be in 2..{len(ASPECTS)}")
    if num_reviews > num_users * num_items:
        raise ValueError(
            f"data.synthetic.num_reviews={num_reviews} exceeds num_users * num_items = "
            f"{num_users * num_items} distinct (user, item) pairs"
        )
    rng = np.random.default_rng(seed)
    user_aspects = np.stack([rng.choice(num_aspects, 2, replace=False) for _ in range(num_users)])
    user_voice = rng.integers(len(VOICES), size=num_users)
    item_quality = rng.integers(-1, 2, size=(num_items, num_aspects))
    pairs = np.sort(rng.choice(num_users * num_items, size=num_reviews, replace=False))
    days = rng.permutation(num_reviews)
    reviews = []
    for pair, day in zip(pairs.tolist(), days.tolist(), strict=True):
        user, item = divmod(pair, num_items)
        aspect_ids = user_aspects[user].tolist()
        qualities = (int(item_quality[item, aspect_ids[0]]), int(item_quality[item, aspect_ids[1]]))
        aspects = (ASPECTS[aspect_ids[0]], ASPECTS[aspect_ids[1]])
        text = review_text(aspects, int(user_voice[user]), qualities)
        rating = 3 + sum(qualities)
        reviews.append(
            Review(
                user=f"u{user}",
                item=f"i{item}",
                rating=float(rating),
                text=text,
                features=aspects,
                timestamp=_FIRST_DAY + day * _DAY,
                summary=SUMMARIES[rating],
                sentence=text,
            )
        )
    return reviews

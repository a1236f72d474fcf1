"""Review at speed: a sample of a job's rows to review, and how often reviewers agree with the judge.

Sample (`GET /v1/jobs/{id}/records?sample=N&strategy=...&seed=S`): N rows drawn from the job's
rows without an error (error rows are never reviewed), deterministic for a seed and a job's rows.
- random: a simple random sample;
- stratified: strata are principle x judge-confidence tertile. The principle is the judged pair's
  (prefs) or the first revision's (sft); the confidence is the judge's 2 |P(chosen) - 0.5|,
  binned at the job's own tertiles (sft rows have none: one bin, n/a). N is split over the strata
  in proportion to their sizes (largest remainders), every stratum getting one row first when N is
  at least the number of strata, so a rare principle or a rare confidence is not left out.
Both report the strata and how many rows each gave, so a reviewer sees what the sample covers.

Agreement (`GET /v1/jobs/{id}/agreement`, prefs): per judged principle, the share of reviewed rows
whose review in force (the latest, as in the export) is agree rather than flip, with n and a 95%
Wilson interval (cai.evaluate.wilson); discarded rows are counted apart. The job status's
`agreement_rate` counts every review of every reviewer; this counts rows.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

from cai.evaluate import wilson
from serve.protocol import Agreement, AgreementReport, SampleInfo, Stratum
from serve.results import (
    iter_records,
    latest_reviews,
    read_lines,
    record_error,
    record_principles,
    record_stratum,
    shard_lines,
    with_reviews,
)

BINS = ("low", "mid", "high")


class Candidate(NamedTuple):
    principle: str
    confidence: float | None


def tertile_cuts(values: Sequence[float]) -> list[float]:
    """The values at the 1/3 and 2/3 ranks (none without values)."""
    ordered = sorted(values)
    return [ordered[len(ordered) * k // 3] for k in (1, 2)] if ordered else []


def confidence_bin(confidence: float | None, cuts: list[float]) -> str:
    return "n/a" if confidence is None or not cuts else BINS[bisect_right(cuts, confidence)]


def allocate(sizes: Sequence[int], n: int) -> list[int]:
    """Rows drawn from each stratum: one each first when n covers every stratum, the rest in proportion
    to what each has left (largest remainders; ties to the earlier stratum)."""
    total = sum(sizes)
    if n >= total:
        return list(sizes)
    base = [1 if n >= len(sizes) else 0 for _ in sizes]
    left = [s - b for s, b in zip(sizes, base)]
    seats = n - sum(base)
    quotas = [seats * room / sum(left) for room in left] if sum(left) else [0.0] * len(sizes)
    taken = [int(q) for q in quotas]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - taken[i]), i))
    for i in by_remainder[: seats - sum(taken)]:
        taken[i] += 1
    return [b + t for b, t in zip(base, taken)]


def draw(candidates: Sequence[Any], n: int, strategy: str, seed: int) -> tuple[list[int], SampleInfo]:
    """Indices of the drawn candidates (in a seeded shuffled order) and what the sample covers. A candidate
    is anything with `principle` and `confidence`: a Candidate, a line of a shard index."""
    rng = random.Random(seed)
    cuts = tertile_cuts([c.confidence for c in candidates if c.confidence is not None])
    key_of = [(c.principle, confidence_bin(c.confidence, cuts)) for c in candidates]
    strata: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(key_of):
        strata.setdefault(key, []).append(i)
    keys = sorted(strata, key=lambda k: (k[0], ("n/a", *BINS).index(k[1])))
    if strategy == "random":
        chosen = rng.sample(range(len(candidates)), min(n, len(candidates)))
    else:
        chosen = []
        for key, k in zip(keys, allocate([len(strata[key]) for key in keys], n)):
            chosen += rng.sample(strata[key], k)
        rng.shuffle(chosen)
    drawn = Counter(key_of[i] for i in chosen)
    info = SampleInfo(strategy=strategy, seed=seed, requested=n, drawn=len(chosen), population=len(candidates),
                      confidence_cuts=cuts, strata=[Stratum(principle=p, confidence=b, population=len(strata[(p, b)]),
                                                            drawn=drawn[(p, b)]) for p, b in keys])
    return chosen, info


def sample_page(job: dict[str, Any], reviews: list[dict[str, Any]], principle: str | None, n: int, strategy: str,
                seed: int) -> tuple[int, list[dict[str, Any]], SampleInfo]:
    """(rows drawn from, the drawn records with their reviews, the sample's strata). From the shard
    indexes (only the drawn rows parsed); a full parse if the shards keep changing under it."""
    for _ in range(2):
        pool = [x for x in shard_lines(job) if not x[2].failed and (not principle or principle in x[2].principles)]
        chosen, info = draw([x[2] for x in pool], n, strategy, seed)
        items = read_lines([pool[i] for i in chosen])
        if items is not None:
            return len(pool), with_reviews(job, reviews, items), info
    records = [r for r in iter_records(job) if record_error(job, r) is None
               and (not principle or principle in record_principles(job, r))]
    chosen, info = draw([Candidate(*record_stratum(job, r)) for r in records], n, strategy, seed)
    return len(records), with_reviews(job, reviews, [records[i] for i in chosen]), info


def _agreement(principle: str | None, agree: int, flip: int) -> Agreement:
    n = agree + flip
    return Agreement(principle=principle, agree=agree, flip=flip, n=n, rate=agree / n if n else None,
                     ci=wilson(agree, n))


def agreement(job: dict[str, Any], reviews: list[dict[str, Any]]) -> AgreementReport:
    """Reviewer-judge agreement over the reviewed rows, overall and per judged principle."""
    principle_of = {x[2].id: x[2].principle for x in shard_lines(job)}
    counts: dict[str, list[int]] = {}
    discarded = 0
    for record_id, review in latest_reviews(reviews).items():
        if review["label"] == "discard":
            discarded += 1
            continue
        tally = counts.setdefault(principle_of.get(record_id, ""), [0, 0])
        tally[review["label"] == "flip"] += 1
    agree, flip = sum(t[0] for t in counts.values()), sum(t[1] for t in counts.values())
    return AgreementReport(overall=_agreement(None, agree, flip), discarded=discarded,
                           principles=[_agreement(p, *counts[p]) for p in sorted(counts)])

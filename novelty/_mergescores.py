"""merge's uncertainty scores: the parts' latest runs (each part scores its own images)
become one run of the merged index when they were scored the same way."""
from __future__ import annotations

from . import records
from .store import Store


def _same_settings(params: dict) -> dict:
    """What must agree for two runs' scores to be one ranking: not where an import came
    from, nor which parts were combined."""
    return {k: v for k, v in params.items() if k not in ("file", "merged_from")}


def _first_difference(a: dict, b: dict) -> str:
    return next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def combine_scores(out: Store, carried: list[tuple[str, tuple[dict, dict] | None]], s) -> None:
    """The parts' latest uncertainty scores (each part scores its own images) as one run
    of the target, so that select ranks the whole pool by them. A run combined by an
    earlier merge into this target keeps the images this merge's parts do not score. The
    target's own uncertainty run (not a merged one) is never superseded: select keeps it.
    Anything that stops the combination is said in s.uncertainty_note (s: merge's
    MergeSummary, whose uncertainty_run and uncertainty_scores are set here)."""
    before = records.latest_uncertainty(out)
    merged_before = before is not None and "merged_from" in before.params
    scored = [(path, c) for path, c in carried if c is not None]
    unscored = [path for path, c in carried if c is None]
    if not scored and not merged_before:
        return  # nobody scored anything: nothing to combine or to warn about
    not_combined = "the parts' uncertainty scores were not combined"
    if unscored:
        s.uncertainty_note = (f"{not_combined}: {unscored[0]} has none; score it (novelty uncertainty --index PART) "
                              f"and merge it again, or run uncertainty on {out.root}")
        return
    want = _same_settings(scored[0][1][0])
    for path, (params, _) in scored[1:]:
        got = _same_settings(params)
        if got != want:
            key = _first_difference(want, got)
            s.uncertainty_note = (f"{not_combined}: they were scored with different settings "
                                  f"({key}: {want.get(key)!r} in {scored[0][0]}, {got.get(key)!r} in {path})")
            return
    if before is not None and not merged_before:
        s.uncertainty_note = (f"{not_combined}: {out.root} has its own uncertainty run #{before.run}, which select keeps "
                              f"using; run uncertainty on {out.root} again to score the merged images")
        return
    ids, values, sources = {}, {}, {path for path, _ in scored}
    old = dict(zip(before.ids.tolist(), before.values.tolist())) if merged_before else {}
    same = merged_before and _same_settings(before.params) == want
    if merged_before:
        had = set(before.params["merged_from"])
        if same:
            values, sources = dict(old), sources | had
        elif not had <= sources:  # scores of parts not given now would be lost, or mixed with another ranking
            got = _same_settings(before.params)
            key = _first_difference(want, got)
            s.uncertainty_note = (f"{not_combined}: run #{before.run} of {out.root} combines parts scored with other "
                                  f"settings ({key}: {got.get(key)!r}, now {want.get(key)!r}); score "
                                  f"{sorted(had - sources)[0]} the same way and merge it again")
            return
    for _, (_, scores) in scored:
        keys = list(scores)
        for column in ("path", "ext_id"):
            ids.update((k, v[0]) for k, v in out.find_keys(column, keys, ("id",)).items())
        values.update((ids[k], v) for k, v in scores.items() if k in ids)
    if same and values == old:
        s.uncertainty_run, s.uncertainty_scores = before.run, len(values)  # merged again: nothing new
    elif values:
        order = sorted(values)
        s.uncertainty_run = records.save_uncertainty(out, {**scored[0][1][0], "merged_from": sorted(sources)}, order,
                                                     [values[i] for i in order])
        s.uncertainty_scores = len(order)

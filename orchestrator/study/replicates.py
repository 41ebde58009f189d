"""A replicated study's verdict: the search is the unit. `study.replicates: R` runs the whole search R times side by
side (each with its own searcher seed, and with `study.replicate_data` its own validation split), confirms each
search's own choices on the same seeds, and judges the method against its reference over the searches, the seeds
nested inside each (Bouthillier et al., MLSys 2021: the search is a source of variation of its own).

    comparisons = across_searches(study, per_search)   # one Comparison per (arm, reference), unit "search"

Per search r, its comparison's paired mean over the seeds it decided on is one difference d_r (the seed-to-seed
and test-example noise are averaged inside it); the verdict is the paired analysis of d_1..d_R: mean, spread,
a Student-t interval over R - 1 degrees of freedom, the bootstrap probability and decide() at that one look. So
its interval covers "another search would have chosen another configuration", which one search cannot show. Two
searches give one degree of freedom: an honest and wide interval. Seeds are added inside each search by its own
sequential comparison (orchestrator/study/confirmation.py); more searches are a larger `study.replicates`.
"""

from __future__ import annotations

from orchestrator.config.study import StudyFile
from orchestrator.study.decision import PairedDifference, decide


def across_searches(study: StudyFile, per_search: list) -> list:
    """One Comparison per (arm, reference) pair of the study, over the searches whose comparison has at least one
    paired seed; a search without one is left out, with its reason."""
    from orchestrator.study.confirmation import Comparison, Configuration

    arms = {arm.name: arm for arm in study.arm_list()}
    groups: dict[tuple[str, str], list] = {}
    for comparison in per_search:
        groups.setdefault((comparison.configuration.arm.name, comparison.baseline.arm.name), []).append(comparison)
    out = []
    for (arm, reference), comparisons in groups.items():
        used = [c for c in comparisons if c.robust.n > 0]
        left_out = {c.configuration.replicate: f"search {c.configuration.replicate}: no seed finished for both"
                    for c in comparisons if c.robust.n == 0}
        searches = tuple(c.configuration.replicate for c in used)
        robust = PairedDifference(searches, tuple(c.robust.mean for c in used))
        clean = (PairedDifference(searches, tuple(c.clean.mean for c in used)) if all(c.clean.n for c in used)
                 else PairedDifference((), ()))
        first = comparisons[0]
        out.append(Comparison(
            Configuration(arm, arms[arm], {}, f"each search's best {arm}"),
            Configuration(reference, arms[reference], {}, f"each search's best {reference}"),
            robust, clean, first.robust_name, first.margin, left_out, decide(robust, first.margin), unit="search",
            searches=len(comparisons)))
    return out

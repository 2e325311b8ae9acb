"""The fuller study (`simmim study`, `make study`), written to docs/results/: the demo's comparison over
seeds and label budgets, what the frozen encoder learned (k-NN and linear probe against a randomly
initialised encoder), how pretraining length matters, the paper's ablations at this scale, the demo per
precision (`--only precision`), and whether continuing pretraining on a new domain pays (`--only continue`).

Every run's result is appended to WORK/results.jsonl as it finishes, so an interrupted study picks up
where it stopped; the report is rebuilt from that file.
"""

from __future__ import annotations

from .domains import continue_part
from .parts import ablation_part, length_part, main_part, precision_part
from .report import write_precision, write_results
from .runs import Runs
from .settings import ABLATIONS, DomainSettings, StudySettings, quick

__all__ = ["ABLATIONS", "DomainSettings", "StudySettings", "quick", "run_study"]


def run_study(s: StudySettings) -> dict:
    """Runs what results.jsonl does not have yet of the part `s.only` (None: main and ablations), then
    writes its report (none for 'main' or 'ablations' alone)."""
    runs = Runs(s)
    if s.only == "precision":
        return write_precision(s, *precision_part(runs))
    if s.only == "continue":
        return continue_part(runs)
    main, probes = main_part(runs) if s.only != "ablations" else ({}, {})
    lengths = length_part(runs) if s.only != "ablations" else {}
    ablations = ablation_part(runs) if s.only != "main" else {}
    return write_results(s, main, probes, lengths, ablations, runs.hours()) if s.only is None else {}

"""``darkmatter plan``: what a study will cost before it runs (time, memory, disk), from its config, the
model's config file and this machine's calibrated throughputs.

- ``calibration``: GEMM and disk throughputs, measured once per machine and cached;
- ``shapes``: the model's dimensions (config file, else a table of the presets' models) and SAE widths;
- ``inputs``: the SAE family and its roles as the study will settle them;
- ``costs``: one cost model per step;
- ``planner``: ``plan_study`` and the ``StudyPlan`` / ``StepPlan`` it returns;
- ``table``: the printed table.
"""

from darkmatter.study.plan.calibration import Calibration, calibrate
from darkmatter.study.plan.planner import StepPlan, StudyPlan, check_plan, plan_study
from darkmatter.study.plan.table import format_plan

__all__ = ["Calibration", "StepPlan", "StudyPlan", "calibrate", "check_plan", "format_plan", "plan_study"]

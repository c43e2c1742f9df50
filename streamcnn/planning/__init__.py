"""The memory planner: predicts a step's peak memory without a GPU and picks the fastest plan that fits.

- :mod:`streamcnn.planning.plannable`: what the planner needs of a model; model copies.
- :mod:`streamcnn.planning.tracking`: live-storage tracking (the instrument).
- :mod:`streamcnn.planning.memory`: predicted peak memory of a step; CUDA allowances.
- :mod:`streamcnn.planning.measurement`: measured peak memory (CPU profiler, CUDA statistics).
- :mod:`streamcnn.planning.flops`: the FLOPs of a step (the cost a plan is ranked by).
- :mod:`streamcnn.planning.tiles`: tile plans summarised from rows and columns; the simulation's reduced plans.
- :mod:`streamcnn.planning.bounds`: a request resolved once; refusals from bounds (budget floor, element limit).
- :mod:`streamcnn.planning.search`: candidates -> simulate -> choose; :func:`enforce_budget`.
- :mod:`streamcnn.planning.report`: the plan report (table, JSON, plot, ``apply``).
"""
from streamcnn.planning.plannable import Plannable
from streamcnn.planning.search import BudgetError, Candidate, PlanReport, enforce_budget, plan

__all__ = ["plan", "enforce_budget", "BudgetError", "Candidate", "PlanReport", "Plannable"]

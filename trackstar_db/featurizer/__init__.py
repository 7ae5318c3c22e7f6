"""TrackStar featurizer: per-example projected, optimizer-corrected loss gradients, and the
preconditioner R fitted on them. See docs/method.md section 1."""

from .config import Block, FeaturizerConfig, Layout, plan_layout
from .per_example import FeaturizeOutput, Featurizer
from .preconditioner import Preconditioner, fit_preconditioner
from .projection import Projections, projection_matrix
from .second_moment import SecondMoment, build_second_moment
from .task import Task
from .tracked import TrackedMatrix, find_tracked

__all__ = ["Block", "FeaturizerConfig", "Layout", "plan_layout", "FeaturizeOutput", "Featurizer",
           "Preconditioner", "fit_preconditioner", "Projections", "projection_matrix", "SecondMoment", "build_second_moment",
           "Task", "TrackedMatrix", "find_tracked"]

"""Analysis of a study's outputs: standardisation, PCA per layer, token classes, validation."""

from susc_core.analysis.analyze import Analysis, analyze
from susc_core.analysis.config import AnalysisConfig, ReportOptions, TokenClassRules, ValidationRules

__all__ = ["Analysis", "AnalysisConfig", "ReportOptions", "TokenClassRules", "ValidationRules",
           "analyze"]

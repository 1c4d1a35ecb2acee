"""The leakage (causality) checks: prove that a layer or a language model never sees the future."""

from lm_moe.causality.checks import CheckResult, Checker, CheckSettings
from lm_moe.causality.subjects import LayerSubject, ModelSubject

__all__ = ["CheckResult", "CheckSettings", "Checker", "LayerSubject", "ModelSubject"]

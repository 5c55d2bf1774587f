"""precision-suite: where do layer chains overflow or underflow in fp16, bf16 and fp8?

Public API: ``run_matrix`` / ``run_case`` run chains, ``Case`` / ``Matrix`` describe them,
``load_results`` / ``Results`` read the JSON contract back.
"""

__version__ = "0.1.0"

from .formats import FORMATS, Format, get_format
from .results import CaseResult, Results, load_results, merge_results
from .runner import run_case, run_matrix
from .spec import Case, Matrix, SpecError

__all__ = ["__version__", "run_matrix", "run_case", "Case", "Matrix", "SpecError", "Results", "CaseResult",
           "load_results", "merge_results", "Format", "FORMATS", "get_format"]

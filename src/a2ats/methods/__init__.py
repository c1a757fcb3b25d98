"""Selection methods, one per file, all behind :class:`Method`."""

from .a2ats import A2ATSMethod
from .base import Method
from .oracle import OracleMethod

__all__ = ["Method", "A2ATSMethod", "OracleMethod"]

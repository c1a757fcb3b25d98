"""Selection methods, one per file, all behind :class:`Method`."""

from .a2ats import A2ATSMethod
from .base import Method
from .full import FullMethod
from .hybrid import HybridMethod
from .oracle import OracleMethod
from .pqcache import PQCacheMethod
from .quest import QuestMethod
from .rerank import RerankMethod
from .streaming import StreamingMethod

__all__ = ["Method", "A2ATSMethod", "FullMethod", "HybridMethod", "OracleMethod", "PQCacheMethod", "QuestMethod", "RerankMethod",
           "StreamingMethod"]

"""Selection methods, one per file, all behind :class:`Method`."""

from a2ats.methods.a2ats import A2ATSMethod
from a2ats.methods.base import Method
from a2ats.methods.full import FullMethod
from a2ats.methods.hybrid import HybridMethod
from a2ats.methods.oracle import OracleMethod
from a2ats.methods.pqcache import PQCacheMethod
from a2ats.methods.quest import QuestMethod
from a2ats.methods.rerank import RerankMethod
from a2ats.methods.streaming import StreamingMethod

__all__ = ["Method", "A2ATSMethod", "FullMethod", "HybridMethod", "OracleMethod", "PQCacheMethod", "QuestMethod", "RerankMethod",
           "StreamingMethod"]

"""precision-suite: where do layer chains overflow or underflow in fp16, bf16 and fp8?"""

__version__ = "0.1.0"

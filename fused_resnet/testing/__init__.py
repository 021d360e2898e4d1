"""What checks the library: the tolerance and shape tables (``tables``) and the float64 oracle (``oracle``),
imported by the tests, the benchmarks and ``fused-resnet verify``. Both are re-exported here."""
from .oracle import (TABLE_HEADER, BranchTape, Check, check, compare_models, print_table, randomize_batchnorm,
                     rel_error, saved_bytes_vs_design, worst)
from .tables import BLOCK_CASES, CONV_CASES, DTYPES, TOLERANCE, ConvShape, bn_input_shapes, conv_shapes

__all__ = ["TABLE_HEADER", "BranchTape", "Check", "check", "compare_models", "print_table", "randomize_batchnorm",
           "rel_error", "saved_bytes_vs_design", "worst", "BLOCK_CASES", "CONV_CASES", "DTYPES", "TOLERANCE",
           "ConvShape", "bn_input_shapes", "conv_shapes"]

"""The model's choice tables, free of TensorFlow: configs and parsers check them before it loads.

Each table is defined here once; `catdog.model.build`, `catdog.model.inference`, the config dataclasses and
the jobs' argparse `choices` all import it.
"""

from __future__ import annotations

# Classifier heads (`catdog.model.build.build_head`): "gap" pools the backbone's map and feeds a Dense
# layer; "flatten" is the Keras tutorial's Flatten head.
HEADS = ("gap", "flatten")

# Keras dtype policy per --precision. bfloat16 runs every layer in bf16: its range is float32's,
# and mixed_bfloat16's per-layer casts cost speed. float16 keeps float32 variables.
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "mixed_float16"}
PRECISIONS = tuple(DTYPE_POLICIES)

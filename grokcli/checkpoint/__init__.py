"""The official Grok-1 checkpoint layout: leaf order, schema parser, reader, writer.

`<dir>/ckpt-0/tensor{i:05d}_000` holds the i-th leaf of `grokcli.params.param_specs(cfg)`, one
protocol-4 pickle per file (see ../shared/fixtures/README.md). Files are never `pickle.load`ed:
`load_leaf` parses exactly the release's opcode sequence (`schema`) and builds nothing the file names.
"""

from .reader import (check_checkpoint_shapes, iter_leaves, read_checkpoint, read_leaf,
                     resolve_checkpoint_dir, tensor_path, validate_leaf)
from .unpickle import ArrayHeader, LeafHeader, load_leaf, parse_header, read_header
from .writer import (dump_leaf, dumps_leaf, expected_file_size, random_params,
                     write_checkpoint, write_sparse_checkpoint)

__all__ = [
    "load_leaf", "read_header", "parse_header", "LeafHeader", "ArrayHeader",
    "read_leaf", "validate_leaf", "check_checkpoint_shapes", "iter_leaves", "read_checkpoint",
    "resolve_checkpoint_dir", "tensor_path",
    "write_checkpoint", "write_sparse_checkpoint", "dump_leaf", "dumps_leaf", "expected_file_size", "random_params",
]

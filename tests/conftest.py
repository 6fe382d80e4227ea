import os

import torch

# The Triton interpreter is read when @triton.jit decorates, so it must be set before any kernel
# module is imported. Without a GPU the triton backend is tested on CPU tensors through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests compare numbers across runs and processes; keep the thread count fixed.
torch.set_num_threads(min(2, os.cpu_count() or 1))

import atexit
import os
import shutil
import tempfile

import torch

# The Triton interpreter is read when @triton.jit decorates, so it must be set before any kernel
# module is imported. Without a GPU the triton backend is tested on CPU tensors through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests compare numbers across runs and processes; keep the thread count fixed.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Nothing is downloaded at run time, and the suite leaves nothing behind in the user's cache:
# the tokenizer cache of medvl.models lives in a fresh folder per session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "MEDVL_CACHE" not in os.environ:
    os.environ["MEDVL_CACHE"] = tempfile.mkdtemp(prefix="medvl-test-cache-")
    atexit.register(shutil.rmtree, os.environ["MEDVL_CACHE"], ignore_errors=True)

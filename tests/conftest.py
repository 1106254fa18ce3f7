import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before they are decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

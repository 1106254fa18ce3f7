import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before they are decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


GPT_FAST = Path(__file__).resolve().parents[2] / "shared" / "peers" / "gpt-fast"


@pytest.fixture(scope="module")
def models():
    """The embedded demo models (target, draft, Medusa and EAGLE heads), fp32 on the CPU."""
    from specdec import embedded

    return embedded.load()


@pytest.fixture(scope="module")
def gpt_fast_path():
    """The gpt-fast checkout beside the repository (CI has it there too), for the benchmark peer."""
    assert (GPT_FAST / "generate.py").is_file(), (
        f"gpt-fast is missing at {GPT_FAST}: the peers checkout (shared/peers/gpt-fast, see shared/peers/README.md) "
        "must sit beside this repository.")
    return GPT_FAST

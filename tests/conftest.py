import os

# Spin-waiting OpenMP threads were measured 10x slower on the shared 2-core machines (EVAL_INFRA.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when a kernel is decorated; set it before any test imports a kernel so the
# same kernels run on CPU through the interpreter (EVAL_INFRA.md §1). On a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

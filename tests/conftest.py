import os

import pytest
import torch

# Tests are verified on the CPU with a fixed thread count; numerics compared in float64 are exact to ~1e-12.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def tol(dtype: torch.dtype) -> dict:
    """Tolerances for comparing normlab against PyTorch.

    float64 near machine precision, float32 a few ulp of O(1) values.
    """
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 2e-5}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["native", "native-python", "tensor-ops"])
def backend(request, monkeypatch):
    """Run a test on every CPU path: the compiled kernels in the C++ eager operators ("native"), the same
    kernels through the Python autograd path that serves when the C++ operators cannot be built
    ("native-python"), and the tensor-op kernels."""
    from normlab import _native

    if request.param == "native":
        if not _native.eager_ops():
            pytest.skip("the C++ eager operators are unavailable (no C++ compiler)")
    elif request.param == "native-python":
        if _native.library() is None:
            pytest.skip("native kernels unavailable (no C compiler)")
        monkeypatch.setattr(_native, "eager_ops", lambda: False)
    else:
        monkeypatch.setattr(_native, "usable", lambda *tensors: False)
        monkeypatch.setattr(_native, "eager_ops", lambda: False)
    return request.param

"""The quantization pipeline with its blocks on a GPU (``device="cuda"``): every method runs there and gives a
model as good as the CPU run's.

The CPU and GPU runs do the same arithmetic in a different order, so their searches may part at near-ties: the
test compares what matters, the quantized model's loss on windows no run calibrated on, not the bits.
"""
import pytest
import torch
from tiny_models import save_tiny_model

import quant
from quant.config import GPTQOptions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
OPTS = dict(bits=4, group_size=32, n_samples=8, seqlen=64, dtype="float32", progress=False)
METHODS = {"rtn": {}, "awq": {}, "gptq": {}, "gptq+awq": {"gptq": GPTQOptions(awq_first=True)}}


def _loss(path, ids) -> float:
    model = quant.load(path, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_quantize_on_the_gpu_as_good_as_on_the_cpu(tmp_path, model_type, method):
    src = save_tiny_model(model_type, tmp_path / "src")
    opts = dict(OPTS, method=method.split("+")[0], **METHODS[method])
    on_cpu = quant.quantize(src, tmp_path / "cpu", device="cpu", **opts)
    on_gpu = quant.quantize(src, tmp_path / "gpu", device="cuda", **opts)
    assert on_gpu.peak_device_mb > 0 and on_cpu.peak_device_mb == 0
    ids = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(7))
    cpu_loss, gpu_loss = _loss(tmp_path / "cpu", ids), _loss(tmp_path / "gpu", ids)
    assert abs(gpu_loss - cpu_loss) <= 0.02 * cpu_loss, (cpu_loss, gpu_loss)

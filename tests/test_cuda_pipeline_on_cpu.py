"""The CUDA loader pipeline, run on the CPU: ``loaders.val_loader(device=cuda)`` builds the very ops
the GPU machine runs (decoder writing uint8, ToTensor, ToDevice, ToTorchImage, NormalizeOnDevice),
here with ffcv's ToDevice copying to the CPU instead of the GPU. ffcv then builds and runs the whole
pipeline graph, so the mistakes of the CUDA path that need no GPU to show (an op's declared state,
the dtype, the memory format, the pixels) are found on any machine, before GPU time is spent.
tests/test_cuda.py checks the same on a GPU."""
import pytest
import torch
from ffcv.transforms import ToDevice

from imagenet_ffcv import loaders
from test_cuda import RES, batches_of, check_against_cpu

CPU = torch.device('cpu')


@pytest.fixture
def cuda_ops_on_cpu(monkeypatch):
    """The loaders' ToDevice copies to the CPU, whatever device it is given."""
    monkeypatch.setattr(loaders, 'ToDevice',
                        lambda device, non_blocking=True: ToDevice(CPU, non_blocking))


@pytest.fixture(scope='module')
def cpu_batches(sample_betons):
    return batches_of(loaders.val_loader(path=sample_betons['val'], batch_size=32, num_workers=2,
                                         res=RES, device=CPU))


@pytest.mark.parametrize('dtype', [torch.bfloat16])  # the others differ only in a torch .to()
def test_the_cuda_pipeline_gives_the_cpu_batches(sample_betons, cpu_batches, cuda_ops_on_cpu,
                                                 dtype):
    loader = loaders.val_loader(path=sample_betons['val'], batch_size=32, num_workers=2, res=RES,
                                device=torch.device('cuda', 0), dtype=dtype)
    check_against_cpu(batches_of(loader), cpu_batches, dtype, 'cpu')

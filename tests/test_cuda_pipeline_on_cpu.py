"""The CUDA loader pipeline, run on the CPU: ``loaders.val_loader(device=cuda)`` builds the very ops
the GPU machine runs (decoder writing uint8, ToTensor, ToDevice, ToTorchImage, NormalizeOnDevice),
here with ffcv's ToDevice copying to the CPU instead of the GPU. ffcv then builds and runs the whole
pipeline graph, so the mistakes of the CUDA path that need no GPU to show (an op's declared state,
the dtype, the memory format, the pixels) are found on any machine, before GPU time is spent.
tests/test_cuda.py checks the same on a GPU."""
import pytest
import torch
from ffcv.transforms import ToDevice

from imagenet_ffcv import constants, loaders
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


@pytest.mark.parametrize('dtype', [torch.uint8, torch.float32])
def test_normalize_on_device_leaves_its_input_alone(dtype):
    """NormalizeOnDevice normalises in a copy of its input (ffcv's ring buffer, in place): a float32
    input, which ``Tensor.to`` would return itself, is left as it was too."""
    op = loaders.NormalizeOnDevice(constants.IMAGENET_MEAN, constants.IMAGENET_STD, torch.float32)
    images = torch.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4).to(dtype)
    before = images.clone()
    out = op.generate_code()(images, None)
    mean = torch.tensor(constants.IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(constants.IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    assert torch.equal(images, before)
    assert torch.allclose(out, (before.float() - mean) / std, atol=1e-5)

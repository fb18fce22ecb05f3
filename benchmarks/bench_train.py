"""Training-loop throughput: the trainer's step (``engine.train_one_epoch``: SGD, label smoothing,
channels_last, BlurPool, bf16 autocast on CUDA) fed by our loader, against the same step fed with
one synthetic batch already in place (no loading at all: the limit of the loop). Their ratio is
the fraction of the limit the data path lets the loop reach.

    python benchmarks/bench_train.py                  # CPU: ResNet-18, 128 px (make bench)
    python benchmarks/bench_train.py --device cuda    # one GPU: ResNet-50 at 160 and 192 px, batch 256

Data: the main set of bench_loader (../shared/data/imagewoof320, or the embedded sample), stored
as write_beton.py does by default. Prints a Markdown table; writes bench-results/train.csv.
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, image_sets, machine_line, markdown_table, pooled_samples, write_csv
from imagenet_ffcv import engine, loaders, models
from imagenet_ffcv.writer import write_beton


class Batches:
    """The first ``n`` batches of ``loader`` (the engine takes ``len`` of what it is given)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def __len__(self):
        return self.n

    def __iter__(self):
        batches = iter(self.loader)  # an iterator passed in goes on where it stopped
        for _ in range(self.n):
            yield next(batches)


def steps_per_s(model, optimizer, batches, amp_dtype, device) -> tuple:
    """Run the trainer's epoch function over ``batches``; returns (img/s, seconds)."""
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    stats = engine.train_one_epoch(model=model, loader=batches, optimizer=optimizer,
                                   loss_fn=loss_fn, lr_at=lambda t: 0.01, epoch=0,
                                   amp_dtype=amp_dtype, show_progress=False)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return stats['images'] / seconds, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--arch', help='default: resnet18 on CPU, resnet50 on CUDA')
    p.add_argument('--res', help='default: 128 on CPU, 160,192 on CUDA')
    p.add_argument('--batch-size', type=int, help='default: 32 on CPU, 256 on CUDA')
    p.add_argument('--steps', type=int, help='timed steps per row; default: 8 on CPU, 100 on CUDA')
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='loader threads')
    p.add_argument('--out', default=str(RESULTS))
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    arch = args.arch or ('resnet50' if cuda else 'resnet18')
    res_list = [int(r) for r in (args.res or ('160,192' if cuda else '128')).split(',')]
    bs = args.batch_size or (256 if cuda else 32)
    steps = args.steps or (100 if cuda else 8)
    warmup = 10 if cuda else 2
    amp_dtype = torch.bfloat16 if cuda else None
    torch.backends.cudnn.benchmark = cuda
    print(machine_line())

    name, root = next(iter(image_sets(['imagewoof320']).items()))
    samples = pooled_samples(root, bs * (steps + warmup) + bs)
    rows = []
    with tempfile.TemporaryDirectory(prefix='bench_train_') as tmp:
        beton = Path(tmp) / 'train.beton'
        write_beton(samples, beton, max_res=256, num_workers=os.cpu_count())
        model = models.build_model(arch=arch, num_classes=1000, use_blurpool=True,
                                   channels_last=True).to(device)
        optimizer = torch.optim.SGD(models.param_groups(model, weight_decay=5e-5, bn_wd=False),
                                    lr=0.01, momentum=0.9)
        loader, decoder = loaders.train_loader(
            path=beton, batch_size=bs, num_workers=args.workers, res=res_list[0], os_cache=True,
            device=device, distributed=False, seed=0)
        for res in res_list:
            decoder.output_size = (res, res)
            x, y = next(iter(loader))  # one real batch, kept for the synthetic feed
            x, y = x.clone(), y.clone()
            synthetic = [(x, y)] * (steps + warmup)
            steps_per_s(model, optimizer, Batches(synthetic, warmup), amp_dtype, device)
            limit, _ = steps_per_s(model, optimizer, Batches(synthetic, steps), amp_dtype, device)
            # The real loop: warm-up steps, then the timed steps, in one pass of the loader.
            real_batches = iter(loader)
            steps_per_s(model, optimizer, Batches(real_batches, warmup), amp_dtype, device)
            real, _ = steps_per_s(model, optimizer, Batches(real_batches, steps), amp_dtype,
                                  device)
            common = {'data': name, 'arch': arch, 'device': str(device), 'res': res,
                      'batch_size': bs, 'steps': steps, 'workers': args.workers,
                      'precision': 'bf16' if cuda else 'fp32'}
            rows.append({**common, 'feed': 'synthetic (no loading)', 'img_per_s': round(limit, 1)})
            rows.append({**common, 'feed': 'our loader', 'img_per_s': round(real, 1),
                         'pct_of_synthetic': round(100 * real / limit, 1)})
            print(f'  {res} px: synthetic {limit:.1f} img/s, real {real:.1f} img/s', flush=True)

    print(f'\n### Training loop: {arch} on {device}, batch {bs}, {steps} timed steps after '
          f'{warmup} warm-up steps\n')
    print(markdown_table(rows, [('res', 'res', ''), ('feed', 'fed by', ''),
                                ('precision', 'precision', ''), ('img_per_s', 'img/s', ',.1f'),
                                ('pct_of_synthetic', '% of synthetic', '.0f')]))
    write_csv(Path(args.out) / 'train.csv', rows)
    print(f'\nwrote {Path(args.out) / "train.csv"}')


if __name__ == '__main__':
    main()
